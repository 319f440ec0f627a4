"""How well a process reward model judges steps: per step, and where a chain first goes wrong.

A step is *accepted* when its probability of being correct is at least ``threshold`` (0.5).

- ``step_accuracy``: the fraction of all steps whose verdict matches the label.
- ``first_error_accuracy``: the fraction of chains whose first rejected step is their first wrong
  step; a correct chain counts when no step is rejected (PRM800K's and ProcessBench's reading:
  finding *where* the chain breaks, not only that it does).
- ``always_correct_accuracy``: the step accuracy of answering "correct" to every step, i.e. the
  fraction of steps labelled correct: the baseline a PRM must beat.
"""

from __future__ import annotations


def first_wrong(labels: list[bool]) -> int | None:
    """Index of the first step labelled wrong (None: the chain is correct)."""
    return next((i for i, ok in enumerate(labels) if not ok), None)


def first_rejected(probs: list[float], threshold: float = 0.5) -> int | None:
    """Index of the first step the PRM rejects (None: it accepts every step)."""
    return next((i for i, p in enumerate(probs) if p < threshold), None)


def step_metrics(probs: list[list[float]], labels: list[list[bool]], threshold: float = 0.5) -> dict[str, float]:
    """``step_accuracy``, ``first_error_accuracy`` and ``always_correct_accuracy`` of the chains
    (``probs[i][s]``: the PRM's probability that step s of chain i is correct)."""
    if len(probs) != len(labels) or any(len(p) != len(l) for p, l in zip(probs, labels)):
        raise ValueError("probs and labels must have the same shape (one value per step of every chain)")
    steps = [(p >= threshold, ok) for ps, ls in zip(probs, labels) for p, ok in zip(ps, ls)]
    if not steps:
        raise ValueError("no steps to evaluate")
    chains = [first_rejected(p, threshold) == first_wrong(l) for p, l in zip(probs, labels)]
    return {"step_accuracy": sum(accepted == ok for accepted, ok in steps) / len(steps),
            "first_error_accuracy": sum(chains) / len(chains),
            "always_correct_accuracy": sum(ok for _, ok in steps) / len(steps)}
