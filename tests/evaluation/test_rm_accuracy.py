"""``rlhfkit eval-rm`` on a hand-made set with a ``file.py:function`` reward whose agreement is known
by construction: ties count as wrong; per-subset accuracy; the size-weighted section score."""

from __future__ import annotations

import json
import math

import pytest

from core_helpers import write_jsonl, write_text
from rlhfkit.evaluation.rm_accuracy import agreement

pytestmark = pytest.mark.usefixtures("one_thread")

REWARD = '''
def length(prompts, completions):
    for p in prompts:
        if not isinstance(p, str):
            raise TypeError("prompts must arrive as plain strings")
    return [len(c) for c in completions]


def wrong_count(prompts, completions):
    return [1.0]
'''

# (subset, chosen, rejected): the reward is len(completion)
PAIRS = [
    ("a", "longer one", "short"),    # 10 > 5   correct   margin  5
    ("a", "abcd", "wxyz"),           # 4 = 4    tie: wrong margin 0
    ("a", "xxxxxx", "yyy"),          # 6 > 3    correct   margin  3
    ("b", "no", "nope!"),            # 2 < 5    wrong     margin -3
    ("b", "yes yes", "yes"),         # 7 > 3    correct   margin  4
    ("b", "abc", "xyz"),             # tie      wrong     margin  0
    ("c", "ab", "a"),                # correct            margin  1
]


@pytest.fixture
def eval_set(tmp_path):
    rows = [{"prompt": f"q{i}", "chosen": c, "rejected": r, "subset": s} for i, (s, c, r) in enumerate(PAIRS)]
    rows[0]["prompt"] = [{"role": "system", "content": "sys"}, {"role": "user", "content": "q0"}]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    reward = write_text(tmp_path / "reward.py", REWARD)
    return data, reward


def test_accuracy_by_construction(eval_set, run_cli, tmp_path):
    data, reward = eval_set
    result = run_cli("eval-rm", "--reward", f"{reward}:length", "--data", data, "--output", tmp_path / "out")
    assert result.code == 0, result.err
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    assert report["n"] == 7
    assert report["accuracy"] == pytest.approx(4 / 7)
    assert report["subsets"] == {"a": {"accuracy": pytest.approx(2 / 3), "n": 3},
                                 "b": {"accuracy": pytest.approx(1 / 3), "n": 3},
                                 "c": {"accuracy": 1.0, "n": 1}}
    # size-weighted: (3 * 2/3 + 3 * 1/3 + 1 * 1) / 7
    assert report["section_score"] == pytest.approx(4 / 7)
    assert report["margin"] == pytest.approx(10 / 7)
    lengths = [len(x) for _, c, r in PAIRS for x in (c, r)]
    mean = sum(lengths) / len(lengths)
    assert report["reward_mean"] == pytest.approx(mean)
    assert report["reward_std"] == pytest.approx(math.sqrt(sum((x - mean) ** 2 for x in lengths) / len(lengths)))

    assert "| a | 3 | 0.667 |" in result.out and "| **all** | 7 | 0.571 |" in result.out
    assert "section score (subsets weighted by size): 0.571" in result.out
    assert "| **all** | 7 | 0.571 |" in (tmp_path / "out" / "report.md").read_text()


def test_section_score_weights_subsets_by_size(tmp_path, run_cli):
    """Unequal subsets: a = 3/3 (n 3), b = 0/1 (n 1): the size-weighted score is 3/4, not the
    unweighted mean 1/2."""
    rows = [{"prompt": "p", "chosen": "long" * (i + 2), "rejected": "s", "subset": "a"} for i in range(3)]
    rows.append({"prompt": "p", "chosen": "s", "rejected": "long", "subset": "b"})
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    reward = write_text(tmp_path / "r.py", REWARD)
    assert run_cli("eval-rm", "--reward", f"{reward}:length", "--data", data, "--output", tmp_path / "o").code == 0
    report = json.loads((tmp_path / "o" / "results.json").read_text())
    assert report["section_score"] == pytest.approx(0.75)
    assert report["subsets"]["b"] == {"accuracy": 0.0, "n": 1}


def test_records_without_subset_form_one_group(tmp_path, run_cli):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "chosen": "aa", "rejected": "b"}])
    reward = write_text(tmp_path / "r.py", REWARD)
    assert run_cli("eval-rm", "--reward", f"{reward}:length", "--data", data, "--output", tmp_path / "o").code == 0
    report = json.loads((tmp_path / "o" / "results.json").read_text())
    assert report["subsets"] == {"all": {"accuracy": 1.0, "n": 1}} and report["accuracy"] == 1.0


def test_agreement_counts_ties_as_wrong():
    stats = agreement([1.0, 2.0, 3.0, 0.5], [1.0, 1.0, 4.0, 0.0])
    assert stats["accuracy"] == 0.5
    assert stats["margin"] == pytest.approx((0 + 1 - 1 + 0.5) / 4)
    assert math.isnan(agreement([], [])["accuracy"])


@pytest.mark.parametrize("spec, message", [
    ("{dir}/missing.py:length", "no such file: {dir}/missing.py"),
    ("{dir}/reward.py:nothing", "has no function nothing"),
    ("{dir}/reward.py:wrong_count", "returned 1 scores for 7 completions"),
    ("just-a-name", "expected a reward-model folder, file.py:function"),
])
def test_bad_reward_specs_exit_2(spec, message, eval_set, run_cli, tmp_path):
    data, reward = eval_set
    result = run_cli("eval-rm", "--reward", spec.format(dir=tmp_path), "--data", data)
    assert result.code == 2
    assert len(result.errors) == 1 and message.format(dir=tmp_path) in result.errors[0]
