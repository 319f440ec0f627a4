"""Win rates against a reference model, raw and length-controlled (pure functions).

A *preference* is the judge's verdict from the evaluated model's side: 1.0 the model's answer
was preferred, 0.0 the reference's, 0.5 a tie (including a pair whose two order-swapped
verdicts disagreed).

**Raw win rate** = mean preference = (wins + ties / 2) / n.

**Length-controlled win rate** (AlpacaEval 2's ``length_controlled_minimal`` GLM): judges prefer
longer answers, so a model can buy win rate with verbosity. Fit a logistic regression of the
preference on a length-difference term::

    P(model preferred) = σ(a + b · x),   x = tanh((len_model - len_ref) / s)

where lengths are in characters and ``s`` is the sample standard deviation (ddof = 1, as pandas'
``.std()`` in AlpacaEval) of the length differences over the evaluated set (``tanh`` bounds the
influence of a few huge differences). The preferences are soft targets (a tie is y = 0.5). The LC
win rate is the prediction at zero length difference, ``σ(a)``: the win rate the model would have
if its answers were as long as the reference's.

The fit is AlpacaEval's (``fit_LogisticRegressionCV`` in alpaca_eval/metrics/glm_winrate.py): an
L1 penalty ``|w|₁ + C · Σ log-loss`` with no separate intercept (``a`` is penalised like ``b``), ``C``
chosen from scikit-learn's default grid ``logspace(-4, 4, 10)`` by 5-fold cross-validation on the
soft-label log loss, with the folds scikit-learn's ``GroupKFold`` makes; then refitted on every
comparison. Agreement with alpaca-eval 0.6.6 is pinned in tests/evaluation/test_winrate_alpaca_eval.py.
Its standard error is from the inverse Hessian at the fit (plus a weak ridge ``LC_L2``, so that
it stays finite on separable data) by the delta method: ``SE = σ(a)(1 - σ(a)) · sqrt(Var(a))``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

LC_L2 = 1e-2                     # ridge added to the Hessian behind the standard errors
CV_CS = np.logspace(-4, 4, 10)   # the penalties tried (scikit-learn LogisticRegressionCV's default, AlpacaEval's)
CV_FOLDS = 5                     # AlpacaEval's n_splits


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
    c: float = float("nan")  # the inverse L1 penalty cross-validation chose
    difficulty_coef: float = float("nan")  # d, the weight of the instruction difficulty (when given)

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
    """``x = tanh((len_model - len_ref) / s)`` and ``s`` (default: the sample std of the differences, ddof=1).

    When every difference is equal (``s = 0``) the feature is zero: length explains nothing.
    """
    diff = np.asarray(list(len_model), dtype=float) - np.asarray(list(len_ref), dtype=float)
    s = (float(diff.std(ddof=1)) if diff.size > 1 else 0.0) if scale is None else float(scale)
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


def _soft_log_loss(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-row ``-y log σ(z) - (1 - y) log σ(-z)`` (soft targets)."""
    return y * np.logaddexp(0, -z) + (1 - y) * np.logaddexp(0, z)


def fit_logistic_l1(features: np.ndarray, targets: np.ndarray, c: float, max_iter: int = 100,
                    tol: float = 1e-10) -> np.ndarray:
    """``argmin_w |w|₁ + c · Σ_i soft-log-loss(x_i · w, y_i)``: liblinear's L1 logistic regression.

    Proximal Newton: each step minimises the quadratic model of the loss plus the L1 term by
    coordinate descent (soft-thresholding), then backtracks on the true objective. Meant for a
    few features (the inner loop is per coordinate).
    """
    x = np.asarray(features, dtype=float)
    y = np.asarray(targets, dtype=float)
    w = np.zeros(x.shape[1])

    def objective(v: np.ndarray) -> float:
        return float(np.abs(v).sum() + c * _soft_log_loss(x @ v, y).sum())

    value = objective(w)
    for _ in range(max_iter):
        p = 1.0 / (1.0 + np.exp(-(x @ w)))
        grad = c * x.T @ (p - y)
        hess = c * (x * (p * (1 - p))[:, None]).T @ x + 1e-12 * np.eye(x.shape[1])
        step = _lasso_step(w, grad, hess, tol)
        t = 1.0
        while objective(w + t * step) > value + 1e-12 and t > 1e-10:
            t *= 0.5
        w = w + t * step
        value = objective(w)
        if np.max(np.abs(t * step)) < tol:
            break
    return w


def _lasso_step(w: np.ndarray, grad: np.ndarray, hess: np.ndarray, tol: float, sweeps: int = 500) -> np.ndarray:
    """``argmin_d grad·d + ½ dᵀ hess d + |w + d|₁`` by cyclic coordinate descent.

    Plain Python floats: with a few coordinates, numpy's per-call overhead would dominate.
    """
    n = w.size
    w0, g0, h = w.tolist(), grad.tolist(), hess.tolist()
    d = [0.0] * n
    for _ in range(sweeps):
        biggest = 0.0
        for j in range(n):
            row = h[j]
            u = w0[j] + d[j]
            target = u - (g0[j] + sum(row[k] * d[k] for k in range(n))) / row[j]
            shrink = 1.0 / row[j]
            new = target - shrink if target > shrink else target + shrink if target < -shrink else 0.0
            biggest = max(biggest, abs(new - u))
            d[j] = new - w0[j]
        if biggest < tol:
            break
    return np.array(d)


def cv_folds(n: int, k: int = CV_FOLDS) -> np.ndarray:
    """The fold of each of ``n`` rows in scikit-learn's ``GroupKFold(k)`` with one group per row.

    Groups of equal size are taken in reverse order (a stable argsort of the sizes, reversed), each
    to the lightest fold, the first of equals: row i goes to fold ``(n - 1 - i) mod k``.
    """
    return (n - 1 - np.arange(n)) % k


def fit_ridge(features: np.ndarray, targets: np.ndarray, c: float) -> np.ndarray:
    """``fit_logistic`` at ``λ = 1 / C``: the L2 counterpart of :func:`fit_logistic_l1`'s ``C``."""
    return fit_logistic(features, targets, l2=1.0 / c)[0]


def fit_logistic_cv(features: np.ndarray, targets: np.ndarray, cs: Sequence[float] = CV_CS,
                    folds: int = CV_FOLDS,
                    fit: Callable[[np.ndarray, np.ndarray, float], np.ndarray] = fit_logistic_l1,
                    ) -> tuple[np.ndarray, float]:
    """AlpacaEval's ``fit_LogisticRegressionCV``: the fit at the ``C`` with the best held-out log loss.

    ``fit(x, y, C)`` is the penalised fit (default the L1 one AlpacaEval uses). Each fold's score is
    the mean soft-label log loss of its held-out rows (a mean over the fold, summed over folds, as
    ``LogisticRegressionCV`` does); the first best ``C`` wins ties. With fewer rows than folds there
    is nothing to cross-validate and the weakest penalty (largest ``C``) is used. Returns the
    weights refitted on every row and the chosen ``C``.
    """
    x = np.asarray(features, dtype=float)
    y = np.asarray(targets, dtype=float)
    if len(y) < folds:
        best = float(max(cs))
        return fit(x, y, best), best
    fold = cv_folds(len(y), folds)
    scores = np.zeros(len(cs))
    for k in range(folds):
        train, test = fold != k, fold == k
        for i, c in enumerate(cs):
            w = fit(x[train], y[train], c)
            p = np.clip(1.0 / (1.0 + np.exp(-(x[test] @ w))), 1e-15, 1 - 1e-15)
            scores[i] -= float(np.mean(-(y[test] * np.log(p) + (1 - y[test]) * np.log(1 - p))))
    best = float(cs[int(np.argmax(scores))])
    return fit(x, y, best), best


def _predicted_rate(design: np.ndarray, w: np.ndarray, at: np.ndarray, l2: float) -> tuple[float, float]:
    """Mean of ``σ(at · w)`` over the rows of ``at`` and its delta-method standard error.

    The covariance of ``w`` is the inverse (ridged by ``l2``) Hessian of the log-likelihood at the fit;
    the gradient of the mean is ``mean_i σ'(at_i · w) at_i``.
    """
    p = 1.0 / (1.0 + np.exp(-(design @ w)))
    cov = np.linalg.inv((design * (p * (1 - p))[:, None]).T @ design + l2 * np.eye(design.shape[1]))
    q = 1.0 / (1.0 + np.exp(-(at @ w)))
    grad = ((q * (1 - q))[:, None] * at).mean(axis=0)
    return float(q.mean()), math.sqrt(max(float(grad @ cov @ grad), 0.0))


def length_controlled_win_rate(preferences: Sequence[float], len_model: Sequence[float],
                               len_ref: Sequence[float], l2: float = LC_L2,
                               difficulty: Sequence[float] | None = None) -> LengthControlled:
    """Fit ``P(model preferred) = σ(a + b tanh(Δlen / s) [+ d γ])`` and predict at ``Δlen = 0``.

    ``len_model`` and ``len_ref`` are the answer lengths (characters) per comparison, aligned
    with ``preferences``. See the module docstring for the method (AlpacaEval's L1 fit with a
    cross-validated penalty; ``l2`` only regularises the Hessian behind the standard error).
    With ``difficulty`` (each comparison's instruction's γ, from :func:`instruction_difficulty`) the
    GLM is AlpacaEval's ``length_controlled_v1`` form and the LC win rate is the mean over the
    comparisons of ``σ(a + d γ)``.
    """
    y = _as_preferences(preferences)
    if not (len(y) == len(len_model) == len(len_ref)) or (difficulty is not None and len(difficulty) != len(y)):
        raise ValueError("preferences, len_model, len_ref (and difficulty) must have the same length")
    n = int(y.size)
    if n == 0:
        nan = float("nan")
        return LengthControlled(nan, nan, nan, nan, nan, 0)
    x, s = length_feature(len_model, len_ref)
    extra = [] if difficulty is None else [np.asarray(difficulty, dtype=float)]
    design = np.column_stack([np.ones(n), x, *extra])
    w, c = fit_logistic_cv(design, y)
    at = design.copy()
    at[:, 1] = 0.0  # no length difference
    lc, se = _predicted_rate(design, w, at if extra else at[:1], l2)
    return LengthControlled(lc, se, float(w[0]), float(w[1]), s, n, c,
                            float(w[2]) if extra else float("nan"))


def instruction_difficulty(preferences: Sequence[float], models: Sequence[str], instructions: Sequence[Hashable],
                           len_model: Sequence[float], len_ref: Sequence[float]) -> tuple[dict[Hashable, float], float]:
    """Each instruction's γ, estimated jointly from several models' comparisons with one reference.

    AlpacaEval's joint GLM (its notebooks/instruction_difficulty.ipynb)::

        P(model m preferred on x) = σ(θ_m + φ_m tanh(Δlen / s_m) + γ_x)

    with ``s_m`` the sample std of model m's length differences and γ treatment-coded (the first
    instruction, in sorted order, is 0). A larger γ: the models beat the reference more easily there.
    AlpacaEval fits it with its L1 ``fit_LogisticRegressionCV``; here the penalty is a ridge
    ``λ = 1/C`` with ``C`` chosen by the same cross-validation (:func:`fit_ridge`), which is fast
    with hundreds of instructions. Returns ``{instruction: γ}`` and the chosen ``C``.
    """
    y = _as_preferences(preferences)
    names = sorted(set(models))
    keys = sorted(set(instructions))
    if not (len(y) == len(models) == len(instructions) == len(len_model) == len(len_ref)):
        raise ValueError("preferences, models, instructions, len_model and len_ref must have the same length")
    m_of = np.array([names.index(m) for m in models])
    slope = np.zeros((len(y), len(names)))
    for k in range(len(names)):
        rows = m_of == k
        slope[rows, k] = length_feature(np.asarray(len_model, float)[rows], np.asarray(len_ref, float)[rows])[0]
    bias = np.eye(len(names))[m_of]
    where = {key: i for i, key in enumerate(keys)}
    inst = np.eye(len(keys))[[where[key] for key in instructions]][:, 1:]
    design = np.column_stack([slope, bias, inst, np.ones(len(y))])  # the last: AlpacaEval's not_gamed_baseline
    w, c = fit_logistic_cv(design, y, fit=fit_ridge)
    gamma = np.concatenate([[0.0], w[2 * len(names):2 * len(names) + len(keys) - 1]])
    return {key: float(g) for key, g in zip(keys, gamma)}, c
