"""The one Likert rule (rlhfkit.data.likert): the full table, its inverse, bad points, and the
simulated annotator speaking the same scale."""

from __future__ import annotations

import pytest

from rlhfkit.data.annotators import NoisyBradleyTerryAnnotator
from rlhfkit.data.likert import from_preference, to_preference

# point -> (A preferred, margin): 1..4 prefer A, 5..8 prefer B; the margin is the number of steps
# away from the close call (4 or 5), over 3.
TABLE = {1: (True, 1.0), 2: (True, 2 / 3), 3: (True, 1 / 3), 4: (True, 0.0),
         5: (False, 0.0), 6: (False, 1 / 3), 7: (False, 2 / 3), 8: (False, 1.0)}


def test_to_preference_full_table():
    for point, (a_preferred, margin) in TABLE.items():
        got = to_preference(point)
        assert got[0] is a_preferred and got[1] == pytest.approx(margin, abs=1e-12), point


def test_from_preference_is_the_inverse():
    assert [from_preference(True, s) for s in range(4)] == [4, 3, 2, 1]
    assert [from_preference(False, s) for s in range(4)] == [5, 6, 7, 8]
    for point in TABLE:
        a_preferred, margin = to_preference(point)
        assert from_preference(a_preferred, round(margin * 3)) == point


@pytest.mark.parametrize("bad", [0, 9, -1, 2.5, 3.0, True, "3", None])
def test_points_outside_the_scale_are_refused_naming_the_value(bad):
    with pytest.raises(ValueError, match=rf"from 1 to 8 \(got {bad!r}\)"):
        to_preference(bad)


@pytest.mark.parametrize("bad", [-1, 4, 1.0, True])
def test_steps_outside_0_to_3_are_refused(bad):
    with pytest.raises(ValueError, match=rf"from 0 to 3 \(got {bad!r}\)"):
        from_preference(True, bad)


def test_annotator_points_follow_the_scale():
    """Scores 0 vs 10 at temperature 0.25: p(A) = σ(∓40), so the choice is certain (confidence > 0.9,
    3 steps): "A much better" (1) or "B much better" (8). Equal scores: p = 0.5, confidence 0.5
    (< 0.6, 0 steps): a close call, 4 or 5, with the preferred side matching the point."""
    by_text = {"good": 10.0, "bad": 0.0, "same": 0.0}
    annotator = NoisyBradleyTerryAnnotator(lambda texts: [by_text[t] for t in texts], 0.25, seed=0)
    assert annotator.judge("p", "good", "bad") == 1
    assert annotator.judge("p", "bad", "good") == 8
    close = [annotator.judge("p", "bad", "same") for _ in range(40)]
    assert set(close) == {4, 5}  # a coin flip: both sides come up in 40 draws
