"""Reward shaping: from one score per response to one reward per token.

InstructGPT / Ziegler et al. (2019) form: the reward model's score is paid at the last token
of the response, and every response token pays a KL penalty towards the reference policy,

    R(x, y) = s(x, y) − β · KL(π ‖ π_ref)(x, y),

with the sequence KL estimated per token (:data:`rlhfkit.losses.KL_ESTIMATORS`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhfkit.losses import KL_ESTIMATORS

__all__ = ["shape_rewards", "last_token_index", "penalize_missing_eos", "clip_scores"]


def last_token_index(mask: Tensor) -> Tensor:
    """Index of the last True of each row of ``mask`` ``[B, T]``: ``[B]`` long (−1 for an empty row)."""
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, torch.full_like(positions, -1)).max(dim=-1).values


def shape_rewards(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    kl_coef: float | Tensor,
    estimator: str = "k1",
) -> tuple[Tensor, Tensor]:
    """Per-token rewards for PPO from sequence scores and a KL penalty.

        kl_t = k(log π(y_t), log π_ref(y_t))                   (k = KL_ESTIMATORS[estimator])
        r_t  = −β·kl_t + [t = t_last]·s                        for mask_t True
        r_t  = 0, kl_t = 0                                     for mask_t False

    where t_last is the last True position of the row's mask (the EOS or the last generated
    token). ``scores`` ``[B]``; ``logprobs``, ``ref_logprobs``, ``mask`` ``[B, T]``, aligned
    on the response tokens. Values outside the mask may be anything (inf and nan included)
    and never reach the result. Returns ``(rewards [B, T], kl [B, T])``; every row needs at
    least one real token (``ValueError`` otherwise).
    """
    try:
        kl_fn = KL_ESTIMATORS[estimator]
    except KeyError:
        raise ValueError(f"unknown KL estimator {estimator!r}; known: {', '.join(sorted(KL_ESTIMATORS))}") from None
    mask = mask.bool()
    if not (logprobs.shape == ref_logprobs.shape == mask.shape) or scores.shape != mask.shape[:1]:
        raise ValueError(
            "shape_rewards: scores [B] and logprobs, ref_logprobs, mask [B, T] expected, got "
            f"{tuple(scores.shape)}, {tuple(logprobs.shape)}, {tuple(ref_logprobs.shape)}, {tuple(mask.shape)}"
        )
    last = last_token_index(mask)
    empty = (last < 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"shape_rewards: rows {empty} have no response token in the mask")
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    kl = torch.where(mask, kl_fn(logprobs, ref_logprobs), zero)
    rewards = -kl_coef * kl
    rewards = rewards.scatter_add(1, last.unsqueeze(1), scores.to(rewards.dtype).unsqueeze(1))
    return rewards, kl


def penalize_missing_eos(scores: Tensor, has_eos: Tensor, penalty: float) -> Tensor:
    """Subtract ``penalty`` from the score of every response that did not end with EOS.

        s'_i = s_i − penalty · [not has_eos_i]

    (TRL's ``missing_eos_penalty``): truncated responses are discouraged without replacing
    their score. ``has_eos`` ``[B]`` bool. Returns a new tensor.
    """
    return scores - penalty * (~has_eos.bool()).to(scores.dtype)


def clip_scores(scores: Tensor, clip: float | None) -> Tensor:
    """Clamp scores to [−clip, clip] (``clip=None``: unchanged). Returns a new tensor."""
    if clip is None:
        return scores.clone()
    if clip <= 0:
        raise ValueError(f"clip_scores: clip must be > 0, got {clip}")
    return scores.clamp(-clip, clip)
