"""rlhfkit's length-controlled win rate against AlpacaEval 2's own GLM (alpaca-eval 0.6.6).

The reference figures were computed once by bench/alpaca_eval_lc_reference.py in a scratch venv
with alpaca-eval 0.6.6 (scikit-learn 1.9.1, patsy 1.0.3, numpy 2.4.6), calling its
``make_dmatrix_for_model`` and ``fit_LogisticRegressionCV`` on the seeded synthetic annotations in
alpaca_eval_lc_annotations.json; they are stored here as numbers (alpaca-eval is no dependency).

Tolerance: 1e-5 on the 0-1 scale (0.001 points). Both sides choose the same penalty C by the same
cross-validation; what is left is liblinear's stopping rule (tol 1e-4 on its L1 solver), against our
proximal Newton run to 1e-10. Measured: at most 4.1e-6.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhfkit.evaluation.winrate import length_controlled_win_rate

DATA = json.loads((Path(__file__).parent / "alpaca_eval_lc_annotations.json").read_text())
TOLERANCE = 1e-5

# length_controlled_minimal: LC win rate (0-1) and the C AlpacaEval's cross-validation chose
MINIMAL = {
    "length_only": (0.6287042288041451, 2.782559402207126),
    "quality_with_ties": (0.5960866657817904, 0.3593813663804626),
    "soft_heavy_tail": (0.671523249634925, 21.54434690031882),
}


@pytest.mark.parametrize("name", list(MINIMAL))
def test_lc_win_rate_equals_alpaca_eval_minimal(name):
    s = DATA["one_model"][name]
    lc = length_controlled_win_rate(s["preference"], s["len_model"], s["len_ref"])
    reference, c = MINIMAL[name]
    assert lc.c == pytest.approx(c)
    assert lc.lc_win_rate == pytest.approx(reference, abs=TOLERANCE)
