"""Step accuracy and first-error accuracy of a process reward model, worked by hand."""

from __future__ import annotations

import pytest

from rlhfkit.evaluation.step_accuracy import first_rejected, first_wrong, step_metrics


def test_first_wrong_and_first_rejected():
    assert first_wrong([True, True, False, False]) == 2
    assert first_wrong([True, True]) is None
    assert first_rejected([0.9, 0.5, 0.49, 0.1]) == 2  # 0.5 is accepted (threshold inclusive)
    assert first_rejected([0.9, 0.8]) is None
    assert first_rejected([0.9, 0.6], threshold=0.7) == 1


def test_step_metrics_hand_worked():
    """Four chains, 11 steps, 7 labelled correct (always "correct": 7/11 = 0.636364).
    A: labels T T F F, probs .9 .8 .3 .2 → 4/4 steps right; first wrong 2, first rejected 2: counts.
    B: labels T F F,   probs .9 .7 .2    → 2/3 (step 1 accepted); first rejected 2 ≠ 1: does not count.
    C: labels T T,     probs .6 .4       → 1/2; a correct chain with a rejected step: does not count.
    D: labels T T,     probs .7 .9       → 2/2; a correct chain, nothing rejected: counts.
    step accuracy = (4 + 2 + 1 + 2) / 11 = 9/11; first-error accuracy = 2/4."""
    probs = [[0.9, 0.8, 0.3, 0.2], [0.9, 0.7, 0.2], [0.6, 0.4], [0.7, 0.9]]
    labels = [[True, True, False, False], [True, False, False], [True, True], [True, True]]
    assert step_metrics(probs, labels) == pytest.approx(
        {"step_accuracy": 9 / 11, "first_error_accuracy": 0.5, "always_correct_accuracy": 7 / 11})


def test_a_wrong_chain_rejected_too_early_does_not_count():
    """Rejecting a correct step before the true error finds the wrong place: 0 first-error accuracy,
    though 2 of 3 steps are judged right."""
    assert step_metrics([[0.1, 0.2, 0.3]], [[True, False, False]]) == pytest.approx(
        {"step_accuracy": 2 / 3, "first_error_accuracy": 0.0, "always_correct_accuracy": 1 / 3})


def test_shapes_must_match():
    with pytest.raises(ValueError, match="same shape"):
        step_metrics([[0.5, 0.5]], [[True]])
    with pytest.raises(ValueError, match="no steps"):
        step_metrics([], [])
