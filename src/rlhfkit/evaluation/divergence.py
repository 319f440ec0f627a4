"""The KL between two policies, estimated from samples of one of them; the analytic KL of best-of-N.

KL(π ‖ π_ref) = E_{y∼π}[log π(y|x) − log π_ref(y|x)]: the mean sequence log-ratio over
completions sampled from π (Schulman's k1 at the sequence level: unbiased). One function,
:func:`kl_to_reference`, serves rejection sampling, ``eval-frontier`` and the demo; PPO's
per-token estimates (``rlhfkit.rl.metrics``) use the same estimators (``losses.KL_ESTIMATORS``).
"""

from __future__ import annotations

import math

import torch

from rlhfkit.losses import KL_ESTIMATORS
from rlhfkit.models.packed import Group, completion_logps


def _sequence_logps(model, groups: list[Group], temperature: float, batch_size: int) -> torch.Tensor:
    """log π(y|x) of every completion of ``groups`` (group-major), in eval mode, as float64."""
    was_training = model.training
    model.eval()
    try:
        return completion_logps(model, groups, temperature=temperature, batch_size=batch_size).logps.double()
    finally:
        model.train(was_training)


@torch.no_grad()
def kl_to_reference(policy, reference, groups: list[Group], temperature: float = 1.0, batch_size: int = 8,
                    estimator: str = "k1") -> float:
    """KL(π ‖ π_ref) in nats per completion, from completions sampled from π.

        KL ≈ mean_y k(log π(y|x), log π_ref(y|x))

    ``groups``: each prompt with the completions ``policy`` sampled for it (token ids). k is an
    estimator of :data:`rlhfkit.losses.KL_ESTIMATORS` applied to whole-sequence log-probs: k1
    (the default) is the mean log-ratio, unbiased; k3 = (r − 1) − log r with r = π_ref(y)/π(y)
    is unbiased too and never negative. Both models score under softmax(logits / τ), τ =
    ``temperature`` (the distribution the samples were drawn from, as in PPO's penalty); the
    samples must come from the policy without top-p/top-k truncation for the estimate to be
    unbiased. One :func:`~rlhfkit.models.packed.completion_logps` pass per model, ``batch_size``
    groups per forward.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; known: {', '.join(sorted(KL_ESTIMATORS))}")
    logps = _sequence_logps(policy, groups, temperature, batch_size)
    ref_logps = _sequence_logps(reference, groups, temperature, batch_size)
    return float(KL_ESTIMATORS[estimator](logps, ref_logps).mean())


def best_of_n_kl(n: int) -> float:
    """The analytic KL of best-of-N sampling to the base policy: log N − (N − 1)/N (Stiennon et al.)."""
    return math.log(n) - (n - 1) / n
