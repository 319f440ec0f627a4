"""The 8-point Likert scale of a pairwise judgment, and the one rule from a point to a preference.

The scale is documented in docs/data.md ("The Likert scale"): 1 = A much better ... 4 = A
slightly better, 5 = B slightly better ... 8 = B much better; no middle point. People in the label
app and the simulated annotators of the demo both give such a point; the demo and ``label export``
turn it into a preference and a margin here, so the same judgment trains the reward model with the
same margin wherever it came from.
"""

from __future__ import annotations

STEPS = 3  # from a close call (4 or 5) to "much better" (1 or 8)


def check(likert: int) -> int:
    """``likert`` itself when it is a point of the scale; ValueError naming the value otherwise."""
    if isinstance(likert, bool) or not isinstance(likert, int) or not 1 <= likert <= 8:
        raise ValueError(f"must be an integer from 1 to 8 (got {likert!r})")
    return likert


def to_preference(likert: int) -> tuple[bool, float]:
    """(A preferred, margin): 1..4 prefer A, 5..8 prefer B; the margin is the number of steps
    away from the close call, over 3: 0 for 4 and 5, 1/3 for 3 and 6, 2/3 for 2 and 7, 1 for
    1 and 8 (the preference strength of the Llama 2 margin term)."""
    a_preferred = check(likert) <= 4
    steps = 4 - likert if a_preferred else likert - 5
    return a_preferred, steps / STEPS


def from_preference(a_preferred: bool, steps: int) -> int:
    """The point for a preference ``steps`` (0..3) away from the close call: the inverse of
    :func:`to_preference` (``to_preference(from_preference(a, s)) == (a, s / 3)``)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not 0 <= steps <= STEPS:
        raise ValueError(f"steps must be an integer from 0 to {STEPS} (got {steps!r})")
    return 4 - steps if a_preferred else 5 + steps
