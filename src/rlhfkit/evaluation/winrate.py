"""Win rates against a reference model, raw and length-controlled (pure functions).

A *preference* is the judge's verdict from the evaluated model's side: 1.0 the model's answer
was preferred, 0.0 the reference's, 0.5 a tie (including a pair whose two order-swapped
verdicts disagreed).

**Raw win rate** = mean preference = (wins + ties / 2) / n.

**Length-controlled win rate** (in the spirit of AlpacaEval 2's LC win rate): judges prefer
longer answers, so a model can buy win rate with verbosity. Fit a logistic regression of the
preference on a length-difference term::

    P(model preferred) = σ(a + b · x),   x = tanh((len_model - len_ref) / s)

where lengths are in characters and ``s`` is the standard deviation of the length differences
over the evaluated set (``tanh`` bounds the influence of a few huge differences). The
preferences are used as soft targets (a tie is y = 0.5). The LC win rate is the prediction at
zero length difference, ``σ(a)``: the win rate the model would have if its answers were as
long as the reference's. A weak ridge ``λ/2 (a² + b²)`` keeps the fit finite when the data are
separable (every win longer, every loss shorter). Its standard error is from the inverse
Hessian by the delta method: ``SE = σ(a)(1 - σ(a)) · sqrt(Var(a))``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

LC_L2 = 1e-2


@dataclass
class WinRate:
    n: int
    wins: int
    losses: int
    ties: int
    win_rate: float   # (wins + ties/2) / n; NaN when n == 0
    stderr: float     # sqrt(var(preference) / n)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LengthControlled:
    lc_win_rate: float   # σ(a): predicted preference at zero length difference
    stderr: float        # delta-method standard error of lc_win_rate
    intercept: float     # a
    length_coef: float   # b (per unit of tanh-scaled length difference)
    length_scale: float  # s, characters
    n: int

    def to_dict(self) -> dict:
        return asdict(self)


def _as_preferences(preferences: Sequence[float]) -> np.ndarray:
    y = np.asarray(list(preferences), dtype=float)
    if y.size and (np.any(~np.isfinite(y)) or np.any(y < 0) or np.any(y > 1)):
        raise ValueError("preferences must be in [0, 1] (1 model preferred, 0 reference, 0.5 tie)")
    return y


def win_rate(preferences: Sequence[float]) -> WinRate:
    """Raw win rate with ties counted half, and its standard error.

    >>> win_rate([1, 1, 0, 0.5]).win_rate
    0.625
    """
    y = _as_preferences(preferences)
    n = int(y.size)
    if n == 0:
        return WinRate(0, 0, 0, 0, float("nan"), float("nan"))
    wins = int(np.sum(y > 0.5))
    losses = int(np.sum(y < 0.5))
    mean = float(y.mean())
    stderr = float(y.std() / math.sqrt(n)) if n > 1 else float("nan")
    return WinRate(n, wins, losses, n - wins - losses, mean, stderr)


def length_feature(len_model: Sequence[float], len_ref: Sequence[float],
                   scale: float | None = None) -> tuple[np.ndarray, float]:
    """``x = tanh((len_model - len_ref) / s)`` and ``s`` (default: the std of the differences).

    When every difference is equal (``s = 0``) the feature is zero: length explains nothing.
    """
    diff = np.asarray(list(len_model), dtype=float) - np.asarray(list(len_ref), dtype=float)
    s = float(diff.std()) if scale is None else float(scale)
    if not s > 0:
        return np.zeros_like(diff), 0.0
    return np.tanh(diff / s), s


def fit_logistic(features: np.ndarray, targets: np.ndarray, l2: float = LC_L2,
                 max_iter: int = 100, tol: float = 1e-10) -> tuple[np.ndarray, np.ndarray]:
    """Ridge logistic regression with soft targets by Newton's method.

    ``features`` is ``n × d`` (include a column of ones for an intercept); maximises
    ``Σ y log σ(Xw) + (1 - y) log σ(-Xw) - λ/2 |w|²``. Returns the weights and the inverse
    of the negative Hessian at the optimum (the approximate covariance of the weights).
    """
    x = np.asarray(features, dtype=float)
    y = np.asarray(targets, dtype=float)
    w = np.zeros(x.shape[1])
    eye = np.eye(x.shape[1])

    def objective(v: np.ndarray) -> float:
        z = x @ v
        return float(-(y * np.logaddexp(0, -z) + (1 - y) * np.logaddexp(0, z)).sum()
                     - 0.5 * l2 * v @ v)

    value = objective(w)
    neg_hess = eye * l2
    for _ in range(max_iter):
        p = 1.0 / (1.0 + np.exp(-(x @ w)))
        grad = x.T @ (y - p) - l2 * w
        neg_hess = (x * (p * (1 - p))[:, None]).T @ x + l2 * eye
        step = np.linalg.solve(neg_hess, grad)
        t = 1.0
        while True:
            cand = w + t * step
            new_value = objective(cand)
            if new_value >= value - 1e-12 or t < 1e-8:
                break
            t *= 0.5
        w, value = cand, new_value
        if np.max(np.abs(t * step)) < tol:
            break
    p = 1.0 / (1.0 + np.exp(-(x @ w)))
    neg_hess = (x * (p * (1 - p))[:, None]).T @ x + l2 * eye
    return w, np.linalg.inv(neg_hess)


def length_controlled_win_rate(preferences: Sequence[float], len_model: Sequence[float],
                               len_ref: Sequence[float], l2: float = LC_L2) -> LengthControlled:
    """Fit ``P(model preferred) = σ(a + b tanh(Δlen / s))`` and predict at ``Δlen = 0``.

    ``len_model`` and ``len_ref`` are the answer lengths (characters) per comparison, aligned
    with ``preferences``. See the module docstring for the method.
    """
    y = _as_preferences(preferences)
    if not (len(y) == len(len_model) == len(len_ref)):
        raise ValueError("preferences, len_model and len_ref must have the same length")
    n = int(y.size)
    if n == 0:
        nan = float("nan")
        return LengthControlled(nan, nan, nan, nan, nan, 0)
    x, s = length_feature(len_model, len_ref)
    design = np.column_stack([np.ones(n), x])
    w, cov = fit_logistic(design, y, l2=l2)
    lc = 1.0 / (1.0 + math.exp(-w[0]))
    se = lc * (1 - lc) * math.sqrt(max(cov[0, 0], 0.0))
    return LengthControlled(float(lc), float(se), float(w[0]), float(w[1]), s, n)
