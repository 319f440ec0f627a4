"""Error bars of judged scores (hand-worked) and the repeat machinery under them."""

from __future__ import annotations

import math

import pytest

from rlhfkit.evaluation.judging.calls import Call, call_key, with_repeats
from rlhfkit.evaluation.judging.spread import judge_spread, stderr_over_questions
from rlhfkit.models.backends import reseeded


def test_stderr_over_questions_balanced_is_the_textbook_one():
    # two turns per question; question means 7, 4, 7 -> std(ddof=1) = sqrt(3), / sqrt(3) = 1
    scores = [8, 6, 5, 3, 7, 7]
    assert stderr_over_questions(scores, [1, 1, 2, 2, 3, 3]) == pytest.approx(1.0)
    # one score per question: the plain standard error of the mean
    assert stderr_over_questions([2, 4, 9], "abc") == pytest.approx(3.605551275 / 3 ** 0.5)


def test_stderr_over_questions_unbalanced_clusters():
    # scores 8, 6 (q1) and 4 (q2): mean 6; per-question residual sums 2 and -2
    # SE = sqrt(2/1 * (4 + 4)) / 3 = 4/3 (the mean of question means would be 5.5, not the reported 6)
    assert stderr_over_questions([8, 6, 4], [1, 1, 2]) == pytest.approx(4 / 3)
    assert math.isnan(stderr_over_questions([8, 6], [1, 1]))  # one question: no spread to see
    with pytest.raises(ValueError):
        stderr_over_questions([1.0], [1, 2])


def test_judge_spread_by_hand():
    # variances 1, 0, 4 (ddof=1) over 3 repeats each
    s = judge_spread([[6, 8, 7], [4, 4, 4], [5, 9, 7]])
    assert s.mean_sd == pytest.approx(1.0) and s.answers == 3
    assert s.stderr == pytest.approx(math.sqrt((1 + 0 + 4) / 3) / 3)


def test_judge_spread_answer_with_one_valid_grade_takes_the_mean_variance():
    # [6, 8]: var 2 over 2 grades; [5]: one grade, takes var 2 -> SE = sqrt(2/2 + 2/1) / 2
    s = judge_spread([[6, 8], [5], []])
    assert s.mean_sd == pytest.approx(math.sqrt(2)) and s.answers == 1
    assert s.stderr == pytest.approx(math.sqrt(3) / 2)
    assert math.isnan(judge_spread([[5], [6]]).stderr)


def test_repeats_are_rounds_with_their_own_keys():
    calls = [Call("single", {"question_id": q, "turn": 1, "model": "m"}, [{"role": "user", "content": q}])
             for q in "ab"]
    assert with_repeats(calls, 1) == calls
    rounds = with_repeats(calls, 3)
    assert [(c.meta["question_id"], c.meta["repeat"]) for c in rounds] == [
        ("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2)]
    keys = {call_key("j", c, 0.7, 512) for c in rounds}
    assert len(keys) == 6 and call_key("j", calls[0], 0.7, 512) not in keys


def test_reseeded_moves_a_local_seed_and_leaves_an_endpoint_alone():
    class Local:
        def __init__(self):
            self.seed, self.model = 3, object()

    class Endpoint:
        name = "e"

    local, endpoint = Local(), Endpoint()
    copy = reseeded(local, 2)
    assert copy.seed == 5 and copy.model is local.model and local.seed == 3
    assert reseeded(local, 0) is local and reseeded(endpoint, 2) is endpoint
