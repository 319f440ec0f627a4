"""Advantage estimators: GAE for PPO with a critic, RLOO and GRPO for critic-free methods.

Pure torch functions; the masked statistics come from :mod:`rlhfkit.losses` (one place only).
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhfkit.losses import masked_mean, masked_whiten

__all__ = ["gae", "rloo_advantages", "grpo_advantages", "whiten", "masked_mean", "masked_whiten"]

whiten = masked_whiten
"""Alias of :func:`rlhfkit.losses.masked_whiten` (advantage whitening)."""


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16) over response tokens.

        δ_t = r_t + γ·V_{t+1} − V_t
        A_t = δ_t + γλ·A_{t+1}          (A and V after the last real token are 0)
        R_t = A_t + V_t                 (the value targets, "returns")

    ``rewards``, ``values``, ``mask`` ``[B, T]``. Only the real tokens (``mask`` True) form the
    trajectory: a masked position contributes nothing, gets advantage and return 0, and
    "t + 1" means the next *real* token of the row. With right padding (the usual case) this is
    exactly TRL's/OpenAI's PPO recursion on rewards and values zeroed at the padding; interior
    masked positions (e.g. tool output inside a response) are skipped over. Values and
    rewards at masked positions may hold anything, inf and nan included.

    Not whitened: call :func:`whiten` on the advantages if the recipe wants it. Runs as a
    reverse loop over T, vectorised over the batch, under ``no_grad`` semantics (the inputs
    are detached).
    """
    if not (rewards.shape == values.shape == mask.shape):
        shapes = f"{tuple(rewards.shape)}, {tuple(values.shape)}, {tuple(mask.shape)}"
        raise ValueError(f"gae: rewards, values, mask must have one shape, got {shapes}")
    rewards, values, mask = rewards.detach(), values.detach(), mask.bool()
    zero = torch.zeros_like(rewards[:, 0])
    next_value = zero
    last_gae = zero
    advantages = torch.zeros_like(rewards)
    for t in reversed(range(rewards.shape[1])):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        current = delta + gamma * lam * last_gae
        last_gae = torch.where(m, current, last_gae)
        next_value = torch.where(m, values[:, t], next_value)
        advantages[:, t] = torch.where(m, current, zero)
    returns = torch.where(mask, advantages + values, torch.zeros_like(values))
    return advantages, returns


def _grouped(scores: Tensor, k: int, name: str, min_k: int) -> Tensor:
    if scores.dim() != 1:
        raise ValueError(f"{name}: scores must be 1-D [B*k], got shape {tuple(scores.shape)}")
    if k < min_k:
        raise ValueError(f"{name}: k must be >= {min_k}, got {k}")
    if scores.numel() % k:
        raise ValueError(f"{name}: {scores.numel()} scores do not split into groups of k={k}")
    return scores.view(-1, k)


def rloo_advantages(scores: Tensor, k: int) -> Tensor:
    """REINFORCE leave-one-out advantages (Kool et al. 2019; Ahmadian et al. 2024): ``[B*k]``.

        A_i = r_i − (1/(k−1)) Σ_{j≠i} r_j  =  k/(k−1) · (r_i − mean_group(r))

    ``scores`` ``[B*k]`` holds the k completions of each prompt consecutively
    (prompt 0's k samples, then prompt 1's, ...). Needs k ≥ 2.
    """
    groups = _grouped(scores, k, "rloo_advantages", 2)
    baseline = (groups.sum(dim=1, keepdim=True) - groups) / (k - 1)
    return (groups - baseline).reshape(-1)


def grpo_advantages(scores: Tensor, k: int, eps: float = 1e-4, scale: bool = True) -> Tensor:
    """Group-relative advantages of GRPO (Shao et al. 2024, DeepSeekMath §4.1.2): ``[B*k]``.

        A_i = (r_i − mean_group(r)) / (std_group(r) + eps)     (scale=True)
        A_i =  r_i − mean_group(r)                             (scale=False, Dr. GRPO)

    std is the unbiased (n − 1) standard deviation within each group, as TRL's GRPOTrainer;
    ``scores`` grouped consecutively as in :func:`rloo_advantages`. scale=True needs k ≥ 2.
    """
    groups = _grouped(scores, k, "grpo_advantages", 2 if scale else 1)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (groups.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)
