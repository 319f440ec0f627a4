"""Raw and length-controlled win rates."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rlhfkit.evaluation.winrate import (
    cv_folds,
    fit_logistic,
    fit_logistic_l1,
    length_controlled_win_rate,
    length_feature,
    win_rate,
)


def test_raw_win_rate_counts_ties_half():
    r = win_rate([1, 1, 0, 0.5])
    assert (r.n, r.wins, r.losses, r.ties) == (4, 2, 1, 1)
    assert r.win_rate == pytest.approx(0.625)
    assert math.isnan(win_rate([]).win_rate)
    with pytest.raises(ValueError):
        win_rate([1.5])


def test_length_feature_is_bounded_and_handles_equal_lengths():
    x, s = length_feature([100, 300, 200], [200, 200, 200])
    assert s == pytest.approx(np.std([-100, 100, 0], ddof=1)) == 100.0  # AlpacaEval's (pandas') sample std
    assert np.all(np.abs(x) < 1) and x[2] == 0 and x[0] == pytest.approx(-x[1])
    x, s = length_feature([10, 20], [5, 15])  # every difference is +5: no variation
    assert s == 0.0 and x.tolist() == [0.0, 0.0]


def test_lc_win_rate_when_length_alone_explains_the_preference():
    """The model is longer 80% of the time and the judge only looks at length.

    The preference is drawn from σ(4 tanh(Δ/s)): at zero length difference it is a coin flip.
    Raw win rate is high (~0.75); the LC win rate must come back to ~0.5.
    """
    rng = np.random.default_rng(0)
    n = 2000
    ref = rng.normal(800, 150, n).clip(50)
    longer = rng.random(n) < 0.8
    model = np.where(longer, ref + rng.uniform(100, 600, n), ref - rng.uniform(100, 600, n))
    x, _ = length_feature(model, ref)
    prefs = (rng.random(n) < 1 / (1 + np.exp(-4 * x))).astype(float)
    raw = win_rate(prefs)
    lc = length_controlled_win_rate(prefs, model, ref)
    assert raw.win_rate > 0.7
    assert abs(lc.lc_win_rate - 0.5) < 0.06
    assert abs(lc.lc_win_rate - 0.5) < 3 * lc.stderr + 0.01
    assert lc.length_coef > 2


def test_lc_equals_raw_when_length_is_irrelevant():
    rng = np.random.default_rng(1)
    n = 3000
    ref = rng.normal(500, 100, n)
    model = ref + rng.normal(0, 200, n)
    prefs = (rng.random(n) < 0.7).astype(float)  # quality, not length
    lc = length_controlled_win_rate(prefs, model, ref)
    assert lc.lc_win_rate == pytest.approx(win_rate(prefs).win_rate, abs=0.03)
    assert abs(lc.length_coef) < 0.3


def test_lc_with_ties_as_soft_targets_and_no_length_variation():
    lc = length_controlled_win_rate([1, 0.5, 0.5, 0], [10, 10, 10, 10], [5, 5, 5, 5])
    assert lc.lc_win_rate == pytest.approx(0.5, abs=1e-6)
    assert lc.length_scale == 0.0


def test_lc_stays_finite_when_the_model_always_wins():
    lc = length_controlled_win_rate([1.0] * 20, list(range(20)), [10] * 20)
    assert 0.9 < lc.lc_win_rate < 1.0 and math.isfinite(lc.stderr)


def test_fit_logistic_recovers_coefficients():
    rng = np.random.default_rng(2)
    x = np.column_stack([np.ones(5000), rng.normal(size=5000)])
    y = (rng.random(5000) < 1 / (1 + np.exp(-(x @ np.array([0.5, -1.5]))))).astype(float)
    w, cov = fit_logistic(x, y, l2=1e-6)
    assert w == pytest.approx([0.5, -1.5], abs=0.12)
    assert np.all(np.diag(cov) > 0)


def test_l1_fit_by_hand():
    """Intercept only, every target 0.8 over n = 10 rows: minimise |a| + c·Σ loss.

    For a > 0 the optimum has c·n·(σ(a) - 0.8) + 1 = 0: with c = 1, σ(a) = 0.8 - 1/10 = 0.7.
    With c = 0.1 the pull of the data at a = 0 is c·n·(0.8 - 0.5) = 0.3 < 1: the penalty keeps a at 0.
    """
    ones, y = np.ones((10, 1)), np.full(10, 0.8)
    assert fit_logistic_l1(ones, y, 1.0)[0] == pytest.approx(math.log(0.7 / 0.3), abs=1e-9)
    assert fit_logistic_l1(ones, y, 0.1)[0] == 0.0


def test_cv_folds_are_group_kfolds():
    # GroupKFold: equal groups taken last first, each to the lightest fold (the first of equals)
    assert cv_folds(7, 5).tolist() == [1, 0, 4, 3, 2, 1, 0]
