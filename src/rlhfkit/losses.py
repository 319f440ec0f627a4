"""The losses of the RLHF loop, as small pure torch functions.

Every function takes tensors and returns tensors; none touches a model, an optimiser or a
config. The equation each one implements is in its docstring, with the paper it comes from.
Variants of one objective are separate functions registered by name in a dict
(:data:`DPO_LOSSES`, :data:`OFFLINE_LOSSES`, :data:`KL_ESTIMATORS`), never branches inside one
function: a new variant is a new function plus one dict entry.

Conventions
-----------
* ``B`` batch, ``T`` sequence length, ``V`` vocabulary, ``K`` candidates per prompt.
* Per-sequence losses are returned unreduced (shape ``[B]``); the caller takes the mean, so
  that gradient accumulation and logging stay under its control.
* ``mask`` arguments are boolean (or 0/1) tensors; positions where the mask is False are
  *selected away* (``torch.where``), not multiplied by 0, so ``inf``/``nan`` values there
  (e.g. log-probs of padding under a truncated sampler) cannot leak into a result.
* Log-probabilities are natural logs.

The masked statistics (:func:`masked_mean`, :func:`masked_var`, :func:`masked_whiten`) live
here too, and only here: ``rlhfkit.rl`` imports them from this module.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "token_logps",
    "causal_logps",
    "sft_loss",
    "entropy_from_logits",
    "bradley_terry_loss",
    "listwise_loss",
    "plackett_luce_loss",
    "process_reward_loss",
    "dpo_loss",
    "dpo_sigmoid_loss",
    "dpo_robust_loss",
    "dpo_hinge_loss",
    "dpo_ipo_loss",
    "dpo_simpo_loss",
    "dpo_apo_zero_loss",
    "dpo_bco_pair_loss",
    "DPO_LOSSES",
    "kto_loss",
    "apo_zero_unpaired_loss",
    "kto_reference_point",
    "UNPAIRED_LOSSES",
    "ppo_policy_loss",
    "value_loss",
    "alol_loss",
    "alol_token_loss",
    "awr_loss",
    "OFFLINE_LOSSES",
    "offline_loss",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "KL_ESTIMATORS",
]


# --------------------------------------------------------------------------------------------
# Masked statistics
# --------------------------------------------------------------------------------------------


def _select(x: Tensor, mask: Tensor) -> Tensor:
    """``x`` where ``mask`` is True, 0 elsewhere (robust to inf/nan outside the mask)."""
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Σ_{mask} x, over all elements (``dim=None``) or along ``dim``."""
    selected = _select(x, mask)
    return selected.sum() if dim is None else selected.sum(dim=dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over the positions where ``mask`` is True.

        masked_mean(x, m) = Σ_i m_i·x_i / Σ_i m_i

    over all elements (``dim=None``, a scalar) or along ``dim``. An empty mask gives 0 (not
    nan), with a zero gradient, so an all-padding micro-batch cannot poison a step.
    """
    mask = mask.bool()
    if mask.shape != x.shape:
        mask = mask.expand_as(x)
    num = masked_sum(x, mask, dim)
    den = mask.sum() if dim is None else mask.sum(dim=dim)
    den = den.to(x.dtype)
    safe_den = torch.where(den > 0, den, torch.ones_like(den))
    return num / safe_den


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of ``x`` over the positions where ``mask`` is True (a scalar).

        var = Σ_i m_i (x_i − μ)² / Σ_i m_i,   μ = masked_mean(x, m)

    With ``unbiased=True`` (TRL's default) it is multiplied by Bessel's correction
    n / (n − 1), n = Σ_i m_i; that needs n ≥ 2, else ``ValueError``.
    """
    mask = mask.bool()
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = int(mask.sum().item())
        if n < 2:
            raise ValueError(f"masked_var(unbiased=True) needs at least 2 unmasked values, got {n}")
        var = var * (n / (n - 1))
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Normalise ``x`` to zero mean and unit variance over the masked positions.

        whiten(x) = (x − μ) / sqrt(σ² + eps)        (shift_mean=True)
        whiten(x) = (x − μ) / sqrt(σ² + eps) + μ    (shift_mean=False: only rescale)

    μ and σ² are :func:`masked_mean` and the unbiased :func:`masked_var` over all unmasked
    elements (as TRL's PPO whitens advantages, and rewards with ``shift_mean=False``).
    Positions outside the mask are set to 0.
    """
    mask = mask.bool()
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return _select(whitened, mask)


# --------------------------------------------------------------------------------------------
# Token log-probabilities, SFT, entropy
# --------------------------------------------------------------------------------------------


_CHUNK_ELEMENTS = 1 << 22
"""Logit elements per chunk of rows in :func:`token_logps`' forward (16 MB of float32)."""


def _compute_dtype(logits: Tensor) -> torch.dtype:
    """float32 for half-precision logits, else their own dtype."""
    return torch.float32 if logits.dtype in (torch.float16, torch.bfloat16) else logits.dtype


def _picked_and_lse(logits: Tensor, targets: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """(z[target], logsumexp z) per row of ``logits`` [n, V], z = logits / τ (half precision upcast to
    float32), a chunk of rows at a time so that the temporaries stay small."""
    step = max(1, _CHUNK_ELEMENTS // max(logits.shape[-1], 1))
    picked, lse = [], []
    for rows, index in zip(logits.split(step), targets.split(step)):
        rows = rows.to(_compute_dtype(rows))
        if temperature != 1.0:
            rows = rows / temperature
        picked.append(rows.gather(-1, index[:, None]).squeeze(-1))
        lse.append(torch.logsumexp(rows, dim=-1))
    if not picked:
        empty = logits.new_zeros(0, dtype=_compute_dtype(logits))
        return empty, empty
    return torch.cat(picked), torch.cat(lse)


class _TokenLogps(torch.autograd.Function):
    """z[target] − logsumexp(z), z = logits / τ, with a backward that writes one [n, V] buffer.

    Autograd's own backward of the same expression allocates three (the softmax from logsumexp,
    the zero-filled scatter of gather, their sum): d/dlogits = (onehot(target) − softmax(z))·g / τ.
    Only the logits (as given, not an upcast copy) and the [n] normaliser are saved.
    """

    @staticmethod
    def forward(ctx, logits, targets, temperature):
        picked, lse = _picked_and_lse(logits, targets, temperature)
        ctx.save_for_backward(logits, targets, lse)
        ctx.temperature = temperature
        return picked - lse

    @staticmethod
    def backward(ctx, grad):
        logits, targets, lse = ctx.saved_tensors
        temperature = ctx.temperature
        g = logits.to(_compute_dtype(logits), copy=True)  # the one [n, V] buffer
        if temperature != 1.0:
            g.div_(temperature)
        g.sub_(lse[:, None]).exp_().mul_(-grad[:, None])
        g.scatter_add_(-1, targets[:, None], grad[:, None].to(g.dtype))
        if temperature != 1.0:
            g.div_(temperature)
        return g.to(logits.dtype), None, None


def token_logps(logits: Tensor, targets: Tensor, temperature: float = 1.0) -> Tensor:
    """log-probability of each target token: the one per-token log-prob primitive of rlhfkit.

        logp[i] = log softmax(logits[i] / τ)[targets[i]]
                = logits[i, targets[i]] / τ − logsumexp_v (logits[i, v] / τ)

    ``logits`` ``[..., V]`` and ``targets`` ``[...]`` are aligned (no causal shift: see
    :func:`causal_logps`); τ = ``temperature`` gives the log-probs of the distribution a sampler
    at that temperature draws from. Returns ``[...]``, in float32 for half-precision logits (upcast
    a chunk of rows at a time).

    Memory: the gathered logit minus the log-normaliser, never a full ``log_softmax``; the
    forward's temporaries are one chunk of rows, and when gradients are needed the backward
    writes a single ``[n, V]`` buffer (:class:`_TokenLogps`).
    """
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"token_logps: logits [..., V] and targets [...], got {tuple(logits.shape)} "
                         f"and {tuple(targets.shape)}")
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_targets = targets.reshape(-1)
    if torch.is_grad_enabled() and logits.requires_grad:
        logps = _TokenLogps.apply(flat_logits, flat_targets, temperature)
    else:
        picked, lse = _picked_and_lse(flat_logits, flat_targets, temperature)
        logps = picked - lse
    return logps.view(targets.shape)


def causal_logps(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """Per-token log-probabilities of ``labels`` under causal-LM ``logits`` (:func:`token_logps`).

        logp[b, t] = log softmax(logits[b, t−1])[labels[b, t]]

    for t ≥ 1 (the causal shift: the logits at position t−1 predict token t). The result is
    aligned with ``labels``: ``[B, T]``, with position 0 (which no logit predicts) and every
    ``ignore_index`` label masked out and set to 0. Returns ``(logps [B, T], mask [B, T] bool)``.
    The logits are read in place (no shifted copy): the last position, which predicts nothing,
    is scored against a dummy target and dropped.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"causal_logps: logits [B, T, V] and labels [B, T], got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    valid = F.pad(labels[:, 1:] != ignore_index, (0, 1), value=False)      # valid[b, t]: t predicts t + 1
    following = F.pad(labels[:, 1:], (0, 1), value=0)
    logps = token_logps(logits, torch.where(valid, following, torch.zeros_like(following)))
    logps = torch.where(valid, logps, torch.zeros_like(logps))
    return F.pad(logps[:, :-1], (1, 0), value=0.0), F.pad(valid[:, :-1], (1, 0), value=False)


def sft_loss(
    logits: Tensor, labels: Tensor, ignore_index: int = -100, reduction: str = "mean"
) -> tuple[Tensor, Tensor]:
    """Next-token cross-entropy on shifted logits (supervised fine-tuning).

        L_sum  = −Σ_{b,t: labels[b,t] ≠ ignore} log π(labels[b,t] | labels[b,<t])
        L_mean = L_sum / N,   N = number of labelled tokens (after the shift)

    Returns ``(loss, num_tokens)``. ``reduction="mean"`` equals
    ``F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index)``;
    ``"sum"`` with the token count lets a caller divide by the token count of the whole
    accumulated batch (gradient-accumulation invariant). No labelled token: the loss is 0.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"sft_loss: reduction must be 'mean' or 'sum', got {reduction!r}")
    logps, mask = causal_logps(logits, labels, ignore_index)
    total = -logps.sum()
    num_tokens = mask.sum()
    if reduction == "sum":
        return total, num_tokens
    return total / num_tokens.clamp(min=1).to(total.dtype), num_tokens


def entropy_from_logits(logits: Tensor, chunk_size: int = 128) -> Tensor:
    """Entropy of the softmax distribution at every position: ``[...]`` for logits ``[..., V]``.

        H = −Σ_v p_v log p_v = logsumexp(z) − Σ_v softmax(z)_v · z_v

    Computed ``chunk_size`` rows at a time to bound the temporary ``[rows, V]`` tensors.
    """
    flat = logits.reshape(-1, logits.shape[-1])
    out = []
    for chunk in flat.split(chunk_size):
        chunk = chunk.float() if chunk.dtype in (torch.float16, torch.bfloat16) else chunk
        out.append(torch.logsumexp(chunk, dim=-1) - (torch.softmax(chunk, dim=-1) * chunk).sum(-1))
    entropy = torch.cat(out) if out else flat.new_zeros(0)
    return entropy.reshape(logits.shape[:-1])


# --------------------------------------------------------------------------------------------
# Reward-model losses
# --------------------------------------------------------------------------------------------


def bradley_terry_loss(chosen_rewards: Tensor, rejected_rewards: Tensor, margin: Tensor | None = None) -> Tensor:
    """Pairwise Bradley–Terry loss of a reward model: ``[B]``.

        L = −log σ(r_c − r_r − m)

    (Stiennon et al. 2020; Ouyang et al. 2022). ``margin`` m is Llama 2's per-pair margin
    (Touvron et al. 2023, eq. 2): a larger preference strength demands a larger reward gap.
    """
    logits = chosen_rewards - rejected_rewards
    if margin is not None:
        logits = logits - margin
    return -F.logsigmoid(logits)


def listwise_loss(rewards: Tensor, best: Tensor, mask: Tensor | None = None) -> Tensor:
    """Best-of-K softmax loss of a reward model (Ziegler et al. 2019): ``[B]``.

        L = −log softmax(r)[best] = −r_best + log Σ_k exp(r_k)

    ``rewards`` ``[B, K]``, ``best`` ``[B]`` (index of the preferred candidate). ``mask``
    ``[B, K]`` marks the candidates that exist (rows with fewer than K candidates); missing
    ones are left out of the normaliser. With K = 2 this is :func:`bradley_terry_loss`.
    """
    if mask is not None:
        rewards = rewards.masked_fill(~mask.bool(), float("-inf"))
    logprobs = torch.log_softmax(rewards, dim=-1)
    return -logprobs.gather(-1, best.long().unsqueeze(-1)).squeeze(-1)


def plackett_luce_loss(rewards: Tensor, ranking: Tensor, mask: Tensor | None = None) -> Tensor:
    """Plackett–Luce loss of a (partial) ranking of K candidates: ``[B]``.

        L = −Σ_{j=1..M} log [ exp(r_{π_j}) / Σ_{k ∉ {π_1..π_{j−1}}} exp(r_k) ]

    ``ranking`` ``[B, M]`` lists candidate indices best first (M ≤ K; entries −1 pad shorter
    rankings). At each step the normaliser runs over every existing candidate not yet placed,
    ranked or not, so M = 1 is :func:`listwise_loss` and a full ranking of K = 2 is
    :func:`bradley_terry_loss`. ``mask`` ``[B, K]`` marks the candidates that exist.
    """
    available = torch.ones_like(rewards, dtype=torch.bool) if mask is None else mask.bool().clone()
    loss = rewards.new_zeros(rewards.shape[0])
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    for j in range(ranking.shape[1]):
        idx = ranking[:, j].long()
        valid = idx >= 0
        idx = idx.clamp(min=0)
        # Rows with nothing left keep finite logits so logsumexp's gradient stays finite.
        any_left = available.any(dim=-1, keepdim=True)
        logits = torch.where(available | ~any_left, rewards, torch.full_like(rewards, float("-inf")))
        term = rewards[rows, idx] - torch.logsumexp(logits, dim=-1)
        loss = loss - torch.where(valid, term, torch.zeros_like(term))
        available = available.clone()
        available[rows[valid], idx[valid]] = False
    return loss


def process_reward_loss(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Step-level cross-entropy of a process reward model, summed per sequence: ``[B]``.

        L_b = −Σ_{s ∈ steps(b)} log p_θ(y_s | x_{≤t_s}),   p_θ(· | x_{≤t}) = softmax(z_t)

    ``logits`` ``[B, T, 2]`` (z_t: the logits of "wrong" and "correct" at position t),
    ``labels`` ``[B, T]``: y_s ∈ {0 wrong, 1 correct} at t_s, the separator after step s, and
    ``ignore_index`` everywhere else, so only the separator positions carry loss (Lightman et
    al. 2023, "Let's Verify Step by Step"; Math-Shepherd, Wang et al. 2024; TRL's PRMTrainer).
    A step is correct while the whole chain so far is. The caller divides the sum by the number
    of labelled steps of its batch (a per-step mean, whatever the chains' lengths).
    """
    mask = labels != ignore_index
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    picked = logprobs.gather(-1, labels.clamp(min=0).long().unsqueeze(-1)).squeeze(-1)
    return -masked_sum(picked, mask, dim=-1)


# --------------------------------------------------------------------------------------------
# Direct preference optimisation and its variants
# --------------------------------------------------------------------------------------------
#
# Every variant has the same shape: four per-sequence log-prob tensors [B] (summed over the
# completion tokens), keyword-only hyperparameters, and returns (losses, chosen_rewards,
# rejected_rewards), rewards detached. `dpo_loss` looks the variant up in DPO_LOSSES.


def _logratios(pc: Tensor, pr: Tensor, rc: Tensor | None, rr: Tensor | None) -> tuple[Tensor, Tensor]:
    if rc is None or rr is None:
        raise ValueError("this DPO variant needs reference log-probs (ref_chosen_logps, ref_rejected_logps)")
    return pc - rc, pr - rr


def _implicit_rewards(beta: float, chosen_logratios: Tensor, rejected_logratios: Tensor) -> tuple[Tensor, Tensor]:
    """DPO's implicit rewards r = β·(log π − log π_ref), detached (TRL's ``rewards/*``)."""
    return beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def _need_lengths(name: str, chosen_lengths: Tensor | None, rejected_lengths: Tensor | None) -> None:
    if chosen_lengths is None or rejected_lengths is None:
        raise ValueError(f"DPO loss {name!r} needs chosen_lengths and rejected_lengths (completion token counts)")


def dpo_sigmoid_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """DPO (Rafailov et al. 2023, eq. 7), with conservative label smoothing (cDPO).

        Δ = (log π(y_c) − log π_ref(y_c)) − (log π(y_r) − log π_ref(y_r))
        L = −(1 − ε)·log σ(βΔ) − ε·log σ(−βΔ)

    ε = ``label_smoothing`` is the assumed probability that a label is flipped (Mitchell 2023,
    "A note on DPO with noisy preferences"); ε = 0 is plain DPO. This is the form of Mitchell's
    reference ``preference_loss`` and of TRL before 1.x. TRL 1.16 ignores ``label_smoothing``
    for ``loss_type="sigmoid"``; at ε = 0 the two are identical.
    """
    chosen_lr, rejected_lr = _logratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    logits = beta * (chosen_lr - rejected_lr)
    losses = -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return (losses, *_implicit_rewards(beta, chosen_lr, rejected_lr))


def dpo_robust_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Robust DPO, rDPO (Chowdhury et al. 2024, eq. 8): unbiased under label flips of rate ε.

        L = [ (1 − ε)·(−log σ(βΔ)) − ε·(−log σ(−βΔ)) ] / (1 − 2ε),   0 ≤ ε < 1/2

    Δ as in :func:`dpo_sigmoid_loss`; the same expression as TRL 1.16's ``"robust"``.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    chosen_lr, rejected_lr = _logratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    logits = beta * (chosen_lr - rejected_lr)
    clean = -(1.0 - label_smoothing) * F.logsigmoid(logits)
    flipped = -label_smoothing * F.logsigmoid(-logits)
    losses = (clean - flipped) / (1.0 - 2.0 * label_smoothing)
    return (losses, *_implicit_rewards(beta, chosen_lr, rejected_lr))


def dpo_hinge_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Hinge loss on the log-ratio margin, SLiC-HF style (Zhao et al. 2023; Liu et al. 2024 RSO).

        L = max(0, 1 − βΔ)

    Δ as in :func:`dpo_sigmoid_loss`; 1/β is the margin δ of SLiC. As TRL's ``"hinge"``.
    """
    chosen_lr, rejected_lr = _logratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    losses = torch.relu(1.0 - beta * (chosen_lr - rejected_lr))
    return (losses, *_implicit_rewards(beta, chosen_lr, rejected_lr))


def dpo_ipo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """IPO (Azar et al. 2023, eq. 17) on length-averaged log-ratios, as TRL computes it.

        Δ_avg = (log π(y_c) − log π_ref(y_c)) / |y_c| − (log π(y_r) − log π_ref(y_r)) / |y_r|
        L = (Δ_avg − 1/(2β))²

    β is the paper's τ. The lengths are the completion token counts (clamped to ≥ 1, as TRL);
    they are required. Pass ones to get the un-normalised form of the paper (Mitchell's repo).
    """
    _need_lengths("ipo", chosen_lengths, rejected_lengths)
    chosen_lr, rejected_lr = _logratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    delta_avg = chosen_lr / chosen_lengths.clamp(min=1) - rejected_lr / rejected_lengths.clamp(min=1)
    losses = (delta_avg - 1.0 / (2.0 * beta)) ** 2
    return (losses, *_implicit_rewards(beta, chosen_lr, rejected_lr))


def dpo_simpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    beta: float,
    gamma: float = 0.0,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """SimPO (Meng et al. 2024, eq. 6): reference-free, length-normalised, with a target margin.

        L = −log σ( β·log π(y_c)/|y_c| − β·log π(y_r)/|y_r| − γ )

    The reference log-probs are ignored (may be None); the lengths are required. ``gamma`` is
    the paper's γ (the margin itself, not γ/β). The returned rewards are SimPO's implicit
    rewards β·log π(y)/|y|, detached.
    """
    _need_lengths("simpo", chosen_lengths, rejected_lengths)
    chosen = beta * policy_chosen_logps / chosen_lengths.clamp(min=1)
    rejected = beta * policy_rejected_logps / rejected_lengths.clamp(min=1)
    losses = -F.logsigmoid(chosen - rejected - gamma)
    return losses, chosen.detach(), rejected.detach()


def dpo_apo_zero_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """APO-zero (D'Oosterlinck et al. 2024, eq. 7): push chosen up and rejected down, each alone.

        L = (1 − σ(β·(log π(y_c) − log π_ref(y_c)))) + σ(β·(log π(y_r) − log π_ref(y_r)))

    For data whose chosen answers beat the model's own outputs. As TRL's ``"apo_zero"``.
    """
    chosen_lr, rejected_lr = _logratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    losses = (1.0 - torch.sigmoid(beta * chosen_lr)) + torch.sigmoid(beta * rejected_lr)
    return (losses, *_implicit_rewards(beta, chosen_lr, rejected_lr))


def dpo_bco_pair_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Paired binary-classifier loss (BCO, Jung et al. 2024, without the running reward shift).

        L = −log σ(β·(log π(y_c) − log π_ref(y_c))) − log σ(−β·(log π(y_r) − log π_ref(y_r)))

    Each answer is classified alone: chosen as good, rejected as bad. As TRL 1.16's
    ``"bco_pair"`` (which, unlike the BCO paper, has no running mean δ).
    """
    chosen_lr, rejected_lr = _logratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    losses = -F.logsigmoid(beta * chosen_lr) - F.logsigmoid(-beta * rejected_lr)
    return (losses, *_implicit_rewards(beta, chosen_lr, rejected_lr))


DPO_LOSSES: dict[str, Callable[..., tuple[Tensor, Tensor, Tensor]]] = {
    "sigmoid": dpo_sigmoid_loss,
    "robust": dpo_robust_loss,
    "hinge": dpo_hinge_loss,
    "ipo": dpo_ipo_loss,
    "simpo": dpo_simpo_loss,
    "apo_zero": dpo_apo_zero_loss,
    "bco_pair": dpo_bco_pair_loss,
}
"""DPO-family losses by name. Each takes ``(policy_chosen_logps, policy_rejected_logps,
ref_chosen_logps, ref_rejected_logps, *, beta, ...)`` and returns
``(losses [B], chosen_rewards [B], rejected_rewards [B])``."""


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    gamma: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Dispatch to the DPO variant ``DPO_LOSSES[loss_type]``.

    Returns ``(losses [B], chosen_rewards [B], rejected_rewards [B])``, the rewards being the
    detached implicit rewards β·(log π − log π_ref) (SimPO: β·log π / |y|).

    Hyperparameters a variant does not use are errors, not silently ignored: a non-zero
    ``label_smoothing`` is accepted only by ``sigmoid`` and ``robust``, a non-zero ``gamma``
    only by ``simpo`` (0 and None mean "not set" and are accepted by all). Lengths are data:
    passed to the variants that use them (``ipo``, ``simpo``) and ignored by the others, so a
    caller may always pass them.
    """
    try:
        fn = DPO_LOSSES[loss_type]
    except KeyError:
        known = ", ".join(sorted(DPO_LOSSES))
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; known: {known}") from None
    params = inspect.signature(fn).parameters
    kwargs: dict = {"beta": beta}
    for name, value in (("label_smoothing", label_smoothing), ("gamma", gamma)):
        if not value:  # None or 0: not set
            continue
        if name not in params:
            raise ValueError(f"DPO loss {loss_type!r} does not take {name} (got {value})")
        kwargs[name] = value
    for name, value in (("chosen_lengths", chosen_lengths), ("rejected_lengths", rejected_lengths)):
        if name in params:
            kwargs[name] = value
    return fn(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, **kwargs)


# --------------------------------------------------------------------------------------------
# Unpaired feedback: KTO
# --------------------------------------------------------------------------------------------
#
# One completion per prompt, labelled desirable (True) or undesirable (False). Each function
# takes per-sequence log-probs ``[B]`` and the boolean labels ``[B]`` and returns
# ``(losses [B], rewards [B])``, the rewards being the detached β·(log π − log π_ref).


def kto_reference_point(kl_logratios: Tensor, gather: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """KTO's reference point z_ref, estimated from mismatched pairs as TRL 1.16 does (a scalar, detached).

        z_ref = max(0, mean_{(x, y')} [log π(y'|x) − log π_ref(y'|x)])

    ``kl_logratios`` [B]: the log-ratios of the batch's mismatched pairs (prompt x with another
    example's completion y'), an estimate of KL(π ‖ π_ref) that no gradient flows through. With
    ``gather`` (several processes: it returns every process's value stacked), z_ref is the mean
    of the per-process means, then clamped at 0.
    """
    kl = kl_logratios.detach().mean()
    if gather is not None:
        kl = gather(kl.reshape(1)).mean()
    return kl.clamp(min=0)


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    reference_point: Tensor | float,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """KTO (Ethayarajh et al. 2024, eq. 8) with the weights λ_D, λ_U, as TRL 1.16's ``"kto"``.

        r = log π(y|x) − log π_ref(y|x)
        L = λ_D·(1 − σ(β·(r − z_ref)))   for a desirable y
        L = λ_U·(1 − σ(β·(z_ref − r)))   for an undesirable y

    ``reference_point`` is z_ref (:func:`kto_reference_point`, detached); the paper's loss
    λ_y − v(x, y) is the same up to the constant λ_y. λ_D·n_D / (λ_U·n_U) in [1, 4/3] is the
    paper's advice when desirable and undesirable examples are unbalanced (its eq. 9).
    """
    logratios = policy_logps - ref_logps
    desirable = desirable.bool()
    z = torch.as_tensor(reference_point, dtype=logratios.dtype, device=logratios.device)
    gains = torch.where(desirable, logratios - z, z - logratios)
    weights = torch.where(desirable, torch.full_like(logratios, desirable_weight),
                          torch.full_like(logratios, undesirable_weight))
    return weights * (1.0 - torch.sigmoid(beta * gains)), beta * logratios.detach()


def apo_zero_unpaired_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    reference_point: Tensor | float = 0.0,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Unpaired APO-zero (D'Oosterlinck et al. 2024, eq. 7 on single answers), as TRL 1.16's
    ``"apo_zero_unpaired"``: push desirable answers up and undesirable ones down, no reference point.

        L = λ_D·(1 − σ(β·r))   for a desirable y,     L = λ_U·σ(β·r)   for an undesirable y

    That is :func:`kto_loss` with z_ref = 0 (1 − σ(−βr) = σ(βr)); ``reference_point`` is ignored.
    """
    return kto_loss(policy_logps, ref_logps, desirable, 0.0, beta=beta, desirable_weight=desirable_weight,
                    undesirable_weight=undesirable_weight)


@dataclass(frozen=True)
class UnpairedLoss:
    """A loss on unpaired feedback and what the recipe derives from it."""

    fn: Callable[..., tuple[Tensor, Tensor]]
    reference_point: bool   # needs z_ref: the recipe scores mismatched (KL) pairs, and needs 2+ examples per batch


UNPAIRED_LOSSES: dict[str, UnpairedLoss] = {
    "kto": UnpairedLoss(kto_loss, reference_point=True),
    "apo_zero_unpaired": UnpairedLoss(apo_zero_unpaired_loss, reference_point=False),
}
"""Losses on unpaired feedback by name; each ``fn(policy_logps, ref_logps, desirable, reference_point, *,
beta, desirable_weight, undesirable_weight) -> (losses [B], rewards [B])``."""


# --------------------------------------------------------------------------------------------
# PPO
# --------------------------------------------------------------------------------------------


def ppo_policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, cliprange: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate objective (Schulman et al. 2017, eq. 7), as a loss to minimise.

        ρ_t = exp(log π(a_t) − log π_old(a_t))
        L   = masked_mean_t max( −A_t·ρ_t , −A_t·clip(ρ_t, 1 − ε, 1 + ε) )

    ``logprobs``, ``old_logprobs``, ``mask`` ``[B, T]``; ``advantages`` ``[B, T]``, or ``[B]`` /
    ``[B, 1]`` for sequence-level advantages (GRPO/RLOO), broadcast over the tokens. Returns
    ``(loss, stats)``, stats detached scalars:

    * ``clipfrac``: masked fraction of tokens where the clipped term is the larger one
      (the gradient is cut there), as TRL's ``policy/clipfrac_avg``;
    * ``approxkl``: 0.5·masked_mean((log π − log π_old)²), the k2 estimate of KL(π_old‖π)
      (TRL's PPO ``approxkl``; TRL averaged over all positions, this over the mask);
    * ``ratio``: masked mean of ρ.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    if advantages.dim() == ratio.dim() - 1:  # [B] sequence-level advantages
        advantages = advantages.unsqueeze(-1)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), mask),
            "approxkl": 0.5 * masked_mean(log_ratio**2, mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, cliprange_value: float
) -> tuple[Tensor, Tensor]:
    """PPO's clipped value loss (as OpenAI baselines and TRL's PPO).

        V_clip = clip(V, V_old − ε, V_old + ε)
        L = 0.5 · masked_mean( max( (V − R)², (V_clip − R)² ) )

    Returns ``(loss, clipfrac)``; ``clipfrac`` is the masked fraction of tokens where the
    clipped error is the larger one (TRL's ``val/clipfrac_avg``), detached.
    """
    clipped_values = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    losses_unclipped = (values - returns) ** 2
    losses_clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(losses_unclipped, losses_clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((losses_clipped > losses_unclipped).to(values.dtype), mask)
    return loss, clipfrac


# --------------------------------------------------------------------------------------------
# Offline RL from a fixed data set of scored completions (A-LoL, AWR)
# --------------------------------------------------------------------------------------------
#
# Every variant takes the same tensors: the policy's per-token log-probs of the data's completions
# ``logps`` [B, T] (with gradient), the frozen reference's ``ref_logps`` [B, T], the ``mask`` of real
# tokens [B, T], and each example's advantage A = r − V_ref(x) ``advantages`` [B]; hyperparameters
# are keyword-only. It returns ``(losses [B], stats)``, ``stats`` per-example detached tensors [B].
# `offline_loss` looks the variant up in OFFLINE_LOSSES.


def _clipped_ratio(log_ratio: Tensor, clip: float) -> tuple[Tensor, Tensor]:
    """(clip(exp(log_ratio), 1 − ε, 1 + ε), whether it was clipped), both detached."""
    ratio = torch.exp(log_ratio.detach())
    clipped = torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    return clipped, (clipped != ratio).to(ratio.dtype)


def alol_loss(logps: Tensor, ref_logps: Tensor, mask: Tensor, advantages: Tensor, *,
              clip: float) -> tuple[Tensor, dict[str, Tensor]]:
    """A-LoL (Baheti et al. 2023, "Leftover Lunch"): the whole completion is one action.

        A⁺  = A if A > 0 else 0                      (negative-advantage examples are dropped)
        w   = clip(π(y|x) / π_ref(y|x), 1 − ε, 1 + ε),  π(y|x) = Π_t π(y_t | x, y_<t)
        L   = −A⁺ · w · log π(y|x)

    The weight w is a constant (detached), so ∇L = −A⁺·w·∇log π(y|x): the offline policy gradient
    E_{(x,y)~π_ref}[A_ref(x, y) · π/π_ref · ∇log π] of the paper with its clipped importance
    weight (the authors' code clamps it to [1 − ε, 1 + ε], ε = 0.9). Unlike PPO's clipped
    surrogate the gradient never vanishes: the clip only bounds the weight. ``stats``:
    ``importance_weight`` (w) and ``clipfrac`` (1 where the ratio was clipped).
    """
    mask = mask.bool()
    sequence = masked_sum(logps, mask, dim=-1)
    weight, clipped = _clipped_ratio(sequence - masked_sum(ref_logps, mask, dim=-1), clip)
    positive = torch.clamp(advantages.to(sequence.dtype), min=0.0)
    return -positive * weight * sequence, {"importance_weight": weight, "clipfrac": clipped}


def alol_token_loss(logps: Tensor, ref_logps: Tensor, mask: Tensor, advantages: Tensor, *,
                    clip: float) -> tuple[Tensor, dict[str, Tensor]]:
    """A-LoL seq. (Baheti et al. 2023): the same advantage, one importance weight per token.

        w_t = clip(π(y_t | x, y_<t) / π_ref(y_t | x, y_<t), 1 − ε, 1 + ε)
        L   = −A⁺ · Σ_t w_t · log π(y_t | x, y_<t),      A⁺ = max(A, 0)

    w_t constant (detached), as in the authors' code. A per-token ratio stays near 1 where a
    whole-sequence ratio (a product of T of them) would be clipped. ``stats``:
    ``importance_weight`` and ``clipfrac``, each the mean over the sequence's tokens.
    """
    mask = mask.bool()
    weight, clipped = _clipped_ratio(logps - ref_logps, clip)
    positive = torch.clamp(advantages.to(logps.dtype), min=0.0)
    losses = -positive * masked_sum(weight * logps, mask, dim=-1)
    return losses, {"importance_weight": masked_mean(weight, mask, dim=-1),
                    "clipfrac": masked_mean(clipped, mask, dim=-1)}


def awr_loss(logps: Tensor, ref_logps: Tensor, mask: Tensor, advantages: Tensor, *, beta: float,
             max_weight: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Advantage-weighted regression (Peng et al. 2019): advantage-weighted maximum likelihood.

        w = min(exp(A / β), w_max)
        L = −w · log π(y|x)

    Every example trains, the better ones more (β: the temperature; w_max: AWR's weight clip, 20
    in its code). The reference's log-probs are not used (the argument keeps the variants' shape).
    ``stats``: ``awr_weight`` (w) and ``clipfrac`` (1 where exp(A/β) > w_max).
    """
    mask = mask.bool()
    sequence = masked_sum(logps, mask, dim=-1)
    raw = torch.exp(advantages.to(sequence.dtype).detach() / beta)
    weight = torch.clamp(raw, max=max_weight)
    return -weight * sequence, {"awr_weight": weight, "clipfrac": (raw > max_weight).to(sequence.dtype)}


@dataclass(frozen=True)
class OfflineLoss:
    """A variant of offline RL: its loss and what the recipe derives from it."""

    fn: Callable[..., tuple[Tensor, dict[str, Tensor]]]
    positive_only: bool   # examples with A <= 0 contribute nothing: the recipe leaves them out of the steps
    weight_stat: str      # the stat holding the weight each example's log-likelihood was multiplied by


OFFLINE_LOSSES: dict[str, OfflineLoss] = {
    "alol": OfflineLoss(alol_loss, positive_only=True, weight_stat="importance_weight"),
    "alol-seq": OfflineLoss(alol_token_loss, positive_only=True, weight_stat="importance_weight"),
    "awr": OfflineLoss(awr_loss, positive_only=False, weight_stat="awr_weight"),
}
"""Offline-RL losses by name; each ``fn(logps, ref_logps, mask, advantages, **hyper) -> (losses [B], stats)``."""


def offline_loss(logps: Tensor, ref_logps: Tensor, mask: Tensor, advantages: Tensor, *, algo: str,
                 **hyperparameters: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Dispatch to ``OFFLINE_LOSSES[algo]`` with the ``hyperparameters`` its function takes (the
    others are ignored, so a caller may pass every one: ``clip``, ``beta``, ``max_weight``)."""
    try:
        fn = OFFLINE_LOSSES[algo].fn
    except KeyError:
        raise ValueError(f"unknown offline-RL algo {algo!r}; known: {', '.join(sorted(OFFLINE_LOSSES))}") from None
    params = inspect.signature(fn).parameters
    return fn(logps, ref_logps, mask, advantages, **{k: v for k, v in hyperparameters.items() if k in params})


# --------------------------------------------------------------------------------------------
# KL estimators (Schulman 2020, "Approximating KL divergence")
# --------------------------------------------------------------------------------------------
#
# Tokens are sampled from the policy π; with log r = log π_ref(x) − log π(x), each estimator's
# expectation under π is compared with KL(π ‖ π_ref) = E_π[−log r].


def kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k1 = log π(x) − log π_ref(x) = −log r. Unbiased, high variance, can be negative."""
    return logprobs - ref_logprobs


def kl_k2(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k2 = ½ (log π(x) − log π_ref(x))² = ½ (log r)². Biased (low when π ≈ π_ref), never negative."""
    return 0.5 * (logprobs - ref_logprobs) ** 2


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k3 = (r − 1) − log r, r = π_ref(x)/π(x). Unbiased (E_π[r] = 1), low variance, never negative.

    Computed as expm1(log r) − log r for accuracy near r = 1.
    """
    log_r = ref_logprobs - logprobs
    return torch.expm1(log_r) - log_r


KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}
"""Per-token KL(π ‖ π_ref) estimators by name: ``fn(logprobs, ref_logprobs) -> kl`` elementwise."""
