"""Error bars of judged scores: over questions, and from the judge alone (pure functions).

A mean score has two sources of noise. **Questions**: another sample of questions would give
another mean (:func:`stderr_over_questions`). **The judge**: graded again at its temperature, the
same answer gets another grade (MT-Bench reports the judge's variance at up to ~0.5 points);
with each answer graded R times, :func:`judge_spread` measures it.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np


def stderr_over_questions(scores: Sequence[float], questions: Sequence[Hashable]) -> float:
    """Standard error of ``mean(scores)`` when the questions are the sampled unit.

    The turns of one question are not independent, so the question is the cluster::

        SE = sqrt(n / (n - 1) · Σ_q (Σ_{i ∈ q} (s_i - s̄))²) / N

    (N scores, n questions). When every question has the same number of scores this is the
    textbook ``std(question means, ddof=1) / sqrt(n)``; with turns missing or malformed it is
    still the error bar of the reported mean. NaN for fewer than two questions.
    """
    if len(scores) != len(questions):
        raise ValueError("scores and questions must have the same length")
    residuals: dict[Hashable, float] = defaultdict(float)
    mean = sum(scores) / len(scores) if scores else 0.0
    for s, q in zip(scores, questions):
        residuals[q] += s - mean
    n = len(residuals)
    if n < 2:
        return float("nan")
    return math.sqrt(n / (n - 1) * sum(r * r for r in residuals.values())) / len(scores)


@dataclass
class JudgeSpread:
    """How much the judge's grade of one answer varies between repeats."""

    mean_sd: float      # mean over answers of the sample standard deviation (ddof=1) of its grades
    stderr: float       # standard error of the mean score that comes from the judge alone
    answers: int        # answers with at least two valid grades (the ones that measure it)


def judge_spread(grades: Sequence[Sequence[float]]) -> JudgeSpread:
    """The judge's own variance from repeated grades (``grades[a]``: answer a's valid grades).

    The mean score averages each answer's grades, then the answers (N of them); its variance
    with the answers held fixed is ``Σ_a σ_a² / R_a / N²``. ``σ_a²`` is estimated by the unbiased
    sample variance ``s_a²`` of answer a's ``R_a`` grades; an answer with one valid grade takes
    the mean ``s²`` of the others. Hence::

        SE_judge = sqrt(Σ_a s_a² / R_a) / N

    NaN when no answer has two valid grades.
    """
    graded = [list(g) for g in grades if len(g) > 0]
    var = [float(np.var(g, ddof=1)) for g in graded if len(g) > 1]
    if not var:
        return JudgeSpread(float("nan"), float("nan"), 0)
    fallback = sum(var) / len(var)
    total = sum((float(np.var(g, ddof=1)) if len(g) > 1 else fallback) / len(g) for g in graded)
    mean_sd = sum(math.sqrt(v) for v in var) / len(var)
    return JudgeSpread(mean_sd, math.sqrt(total) / len(graded), len(var))
