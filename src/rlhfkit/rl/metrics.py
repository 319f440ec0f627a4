"""Statistics of a rollout that the RL recipes log: KL by every estimator, reward-hacking signals."""

from __future__ import annotations

from torch import Tensor

from rlhfkit.losses import KL_ESTIMATORS, masked_sum


def sequence_kl(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, estimator: str) -> Tensor:
    """Σ_t k(log π, log π_ref) over the real tokens of each response: ``[N]``."""
    return masked_sum(KL_ESTIMATORS[estimator](logprobs, ref_logprobs), mask, dim=1)


def kl_by_estimator(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor) -> dict[str, float]:
    """Mean over responses of the summed per-token KL, for k1, k2 and k3 (``objective/kl_k*``)."""
    return {name: float(sequence_kl(logprobs, ref_logprobs, mask, name).mean()) for name in KL_ESTIMATORS}


def repeated_ngram_rate(texts: list[str], n: int = 3) -> float:
    """Mean over texts of the fraction of word n-grams that already occurred earlier in the text.

    0 for varied text; near 1 for a loop ("great great great ..."). Texts with fewer than
    ``n + 1`` words count as 0. A reward-hacking signal, logged next to the response length.
    """
    rates = []
    for text in texts:
        words = text.split()
        grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
        if len(grams) < 2:
            rates.append(0.0)
            continue
        rates.append(1.0 - len(set(grams)) / len(grams))
    return sum(rates) / len(rates) if rates else 0.0


__all__ = ["sequence_kl", "kl_by_estimator", "repeated_ngram_rate"]
