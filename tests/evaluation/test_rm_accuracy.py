"""``rlhfkit eval-rm`` on a hand-made set with a ``file.py:function`` reward whose agreement is known
by construction: ties count as wrong; per-subset accuracy; the size-weighted section score."""

from __future__ import annotations

import json
import math

import pytest

from core_helpers import read_metrics, write_jsonl, write_text
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


# ------------------------------------------------------------------ --model/--ref-model: DPO's implicit reward

LONG_PAIRS = [
    {"prompt": "Say something nice.", "chosen": "You are wonderful.", "rejected": "Go away."},
    # longer than --max-length 64 together: the prompt is cut from the left, then both completions
    {"prompt": "Tell me a story about " + "dragons " * 4, "chosen": "Once upon a time " * 3,
     "rejected": "No.", "margin": 1.5},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
     "chosen": [{"role": "assistant", "content": "Hello there, " * 5}],
     "rejected": [{"role": "assistant", "content": "What do you want"}]},
    {"prompt": "How are you?", "chosen": "Great, thanks for asking!", "rejected": "Bad." * 12},
]


def test_ref_implicit_reward_equals_dpo_training_rewards(run_cli, tmp_path):
    """DPO logs rewards/chosen = mean over pairs of β·(log π(y_c) − log π_ref(y_c)) at step 1
    (before its update: π = the initial policy) and eval/rewards/* with the final policy. ``eval-rm
    --model`` on the same pairs, with the same --max-length, gives the same numbers (to 1e-5): pairs
    truncated together, the margin not part of the reward."""
    from rlhfkit.data.schema import load_preferences
    from rlhfkit.evaluation.rm_accuracy import implicit_reward_scores
    from rlhfkit.models.loading import load_tokenizer
    from rlhfkit.models.tiny import make_tiny_causal_lm
    from rlhfkit.recipes.dpo import encode_pair

    policy = make_tiny_causal_lm(tmp_path / "policy", seed=0)
    ref = make_tiny_causal_lm(tmp_path / "ref", seed=1)
    data = write_jsonl(tmp_path / "pairs.jsonl", LONG_PAIRS)
    examples = load_preferences(data)
    tokenizer = load_tokenizer(policy)
    assert sum(encode_pair(tokenizer, ex, 64).truncated for ex in examples) == 3  # long pairs included
    out = tmp_path / "dpo"
    result = run_cli("dpo", "--model", policy, "--ref-model", ref, "--data", data, "--eval-data", data,
                     "--output", out, "--max-length", 64, "--batch-size", 4, "--max-steps", 1, "--lr", "1e-3",
                     "--beta", 0.2, "--no-progress")
    assert result.code == 0, result.err
    assert "3 example(s) truncated and 0 dropped at --max-length 64 (policy: truncate)" in result.out
    (row,) = read_metrics(out)
    for model, prefix in ((policy, ""), (str(out), "eval/")):
        chosen, rejected = implicit_reward_scores(model, ref, examples, 0.2, 2, 64, data)
        assert len(chosen) == len(rejected) == 4
        assert sum(chosen) / 4 == pytest.approx(row[f"{prefix}rewards/chosen"], abs=1e-5)
        assert sum(rejected) / 4 == pytest.approx(row[f"{prefix}rewards/rejected"], abs=1e-5)
        assert abs(row[f"{prefix}rewards/chosen"]) > 1e-3  # π ≠ π_ref: a comparison that can fail
    # the command itself: its mean margin is DPO's eval/rewards/margins
    result = run_cli("eval-rm", "--model", out, "--ref-model", ref, "--data", data, "--beta", 0.2, "--max-length", 64,
                     "--output", tmp_path / "report")
    assert result.code == 0, result.err
    report = json.loads((tmp_path / "report" / "results.json").read_text())
    assert report["margin"] == pytest.approx(row["eval/rewards/margins"], abs=1e-5)
