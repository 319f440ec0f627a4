"""``rlhfkit dpo --online`` through the real CLI on a tiny model: TRL's metric names, the chosen sample is
the higher-reward one, a hand-written reward rises, the judge path against a scripted endpoint,
resume reproduces the uninterrupted run, bad flags exit 2 before any model is loaded."""

from __future__ import annotations

import json
import math
import re
import shutil

import pytest
import torch

from core_helpers import assert_same_params, read_metrics
from scripted_endpoint import ScriptedEndpoint

pytestmark = pytest.mark.usefixtures("one_thread")

TRL_NAMES = ["objective/scores", "objective/scores_margin", "objective/kl", "objective/entropy",
             "objective/non_score_reward", "objective/rlhf_reward", "rewards/chosen", "rewards/rejected",
             "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected", "val/contain_eos_token",
             "beta", "time/generation", "time/scoring", "time/update"]
COMMON = ["step", "epoch", "loss", "learning_rate", "grad_norm", "tokens_per_second", "elapsed_s",
          "completions/mean_length", "completions/repeated_ngram_rate"]
SHOWN = re.compile(r"\[Assistant A's answer\]\n(.*?)\n\[End of assistant A's answer\]\n\n"
                   r"\[Assistant B's answer\]\n(.*?)\n\[End of assistant B's answer\]", re.S)


def online_args(model, prompts, out, *extra) -> list:
    return ["dpo", "--online", "--model", model, "--prompts", prompts, "--output", out, "--max-new-tokens", 8,
            "--no-progress", *extra]


def lower_share(text: str) -> float:
    return sum(ch.islower() and ch.isascii() for ch in text) / max(len(text), 1)


def test_the_chosen_sample_is_the_higher_score_and_a_tie_keeps_the_first():
    """Pairs are rollout rows (0, 1), (2, 3), (4, 5): scores 0.1 < 0.5 -> row 1 chosen; 0.7 > 0.2 -> row 2;
    0.3 = 0.3 -> row 4 (TRL's first >= second)."""
    from rlhfkit.recipes.online_dpo import prefer_by_scores

    preference = prefer_by_scores(torch.tensor([0.1, 0.5, 0.7, 0.2, 0.3, 0.3]))
    assert preference.rows().tolist() == [[1, 0], [2, 3], [4, 5]]
    assert preference.weights.tolist() == [1.0, 1.0, 1.0]


def test_online_dpo_raises_a_hand_written_reward(run_cli, tiny_lm, reward_fn, prompts, tmp_path):
    """25 steps of 8 prompts: every TRL metric is logged and finite, the chosen sample never scores below
    the rejected one, and the mean score of the last five steps beats the first five (about 0.1 -> 0.6)."""
    out = tmp_path / "run"
    result = run_cli(*online_args(tiny_lm, prompts, out, "--reward", reward_fn, "--max-steps", 25, "--lr", 1e-2,
                                  "--lr-schedule", "constant", "--seed", 1))
    assert result.code == 0, result.err
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 26))
    for r in rows:
        for key in TRL_NAMES + COMMON:
            assert isinstance(r[key], (int, float)) and math.isfinite(r[key]), (key, r)
        assert r["objective/scores_margin"] >= 0 and r["beta"] == 0.1
        assert r["objective/non_score_reward"] == pytest.approx(-0.1 * r["objective/kl"])
    assert rows[0]["objective/kl"] == pytest.approx(0, abs=1e-5)  # policy == reference before any update
    assert rows[0]["rewards/chosen"] == pytest.approx(0, abs=1e-5)
    assert rows[-1]["objective/kl"] > 0.1
    scores = [r["objective/scores"] for r in rows]
    assert sum(scores[-5:]) / 5 > sum(scores[:5]) / 5 + 0.15, scores
    assert (out / "model.safetensors").exists() and (out / "checkpoint-25").is_dir()
    saved = (out / "config.yaml").read_text()
    assert "online: true" in saved and "lr: 0.01" in saved


def test_resume_reproduces_the_uninterrupted_run(run_cli, tiny_lm, reward_fn, prompts, tmp_path):
    """4 steps in one go == 2 steps, then --resume for the other 2 (sampling seeded per step; optimizer,
    schedule and weights from checkpoint-2): same final weights, same metrics rows."""
    common = ["--reward", reward_fn, "--max-steps", 4, "--batch-size", 2, "--grad-accum", 2, "--lr", 1e-3,
              "--save-steps", 2, "--save-total-limit", 0]
    full, part = tmp_path / "full", tmp_path / "part"
    assert run_cli(*online_args(tiny_lm, prompts, full, *common)).code == 0
    part.mkdir()
    shutil.copytree(full / "checkpoint-2", part / "checkpoint-2")
    rows = [l for l in (full / "metrics.jsonl").read_text().splitlines() if json.loads(l)["step"] <= 2]
    (part / "metrics.jsonl").write_text("".join(r + "\n" for r in rows))
    assert run_cli(*online_args(tiny_lm, prompts, part, *common, "--resume")).code == 0
    assert_same_params(full, part, atol=1e-6)
    timing = ("elapsed_s", "tokens_per_second")
    drop = lambda r: {k: v for k, v in r.items() if not k.startswith("time/") and k not in timing}  # noqa: E731
    a, b = read_metrics(full), read_metrics(part)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for row_a, row_b in zip(a, b):
        assert drop(row_b) == pytest.approx(drop(row_a), abs=1e-6)
    assert abs(a[3]["objective/kl"]) > 1e-4  # the resumed steps sampled from the trained policy (k1: either sign)


def test_several_rewards_are_combined_as_ppo_combines_them(run_cli, tiny_lm, reward_fn, prompts, tmp_path):
    """--reward repeated with --reward-weight (rl.rewards.build_reward): weights 1 and 0 make the combined
    score the first reward's; each reward's mean is logged as objective/scores/<name>."""
    out = tmp_path / "run"
    result = run_cli(*online_args(tiny_lm, prompts, out, "--reward", f"a={reward_fn}", "--reward", f"b={reward_fn}",
                                  "--reward-weight", 1, "--reward-weight", 0, "--max-steps", 2, "--batch-size", 4))
    assert result.code == 0, result.err
    for r in read_metrics(out):
        assert r["objective/scores"] == pytest.approx(r["objective/scores/a"]) == pytest.approx(r["objective/scores/b"])


def test_samples_from_a_bfloat16_copy(run_cli, tiny_lm, reward_fn, prompts, tmp_path):
    """--sample-dtype bfloat16: the pairs come from a bfloat16 copy refreshed each step; the loss reads the
    float32 policy's log-probs, recomputed on them (the first step's policy is the reference: KL 0)."""
    out = tmp_path / "run"
    result = run_cli(*online_args(tiny_lm, prompts, out, "--reward", reward_fn, "--max-steps", 2, "--batch-size", 4,
                                  "--sample-dtype", "bfloat16"))
    assert result.code == 0, result.err
    rows = read_metrics(out)
    assert len(rows) == 2 and rows[0]["objective/kl"] == pytest.approx(0, abs=1e-5)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)


def judge_by_lower_case(body: dict) -> str:
    """A consistent scripted judge: the answer with more lower-case letters wins (a tie: [[C]])."""
    a, b = SHOWN.search(body["messages"][1]["content"]).groups()
    la, lb = lower_share(a), lower_share(b)
    return "Verdict: [[A]]" if la > lb else "Verdict: [[B]]" if lb > la else "Verdict: [[C]]"


class ScriptedJudge:
    """A backend with only ``complete`` (rlhfkit.models.backends.replies accepts it)."""

    name = "scripted"

    def __init__(self, respond):
        self.respond = respond

    def complete(self, conversations, temperature=0.0, max_tokens=512):
        return [self.respond({"messages": chat}) for chat in conversations]


def test_the_judge_s_preferred_sample_is_chosen_and_undecided_pairs_are_left_out():
    """Rows (0, 1): "abc" beats "XY" in both orders -> row 0 chosen; rows (2, 3): "Q!" loses to "hello" ->
    row 3 chosen; rows (4, 5): equal shares of lower case -> [[C]] both times, a tie: weight 0."""
    from rlhfkit.recipes.online_dpo import prefer_by_judge

    completions = ["abc", "XY", "Q!", "hello", "ab", "cd"]
    preference = prefer_by_judge(ScriptedJudge(judge_by_lower_case), ["p"] * 6, completions, 64)
    assert preference.rows().tolist()[:2] == [[0, 1], [3, 2]]
    assert preference.weights.tolist() == [1.0, 1.0, 0.0]
    assert preference.stats == pytest.approx({"judge/decided": 2 / 3, "judge/ties": 1 / 3, "judge/invalid": 0})
    biased = prefer_by_judge(ScriptedJudge(lambda body: "[[A]]"), ["p"] * 6, completions, 64)
    assert biased.weights.tolist() == [0.0, 0.0, 0.0] and biased.stats["judge/ties"] == 1


def test_a_pairwise_judge_picks_the_chosen_sample(run_cli, tiny_lm, prompts, tmp_path):
    """Through an endpoint: each pair is judged in both orders (2 steps × 4 pairs × 2 requests, greedy);
    a consistent judge decides the pairs whose samples differ in lower-case share."""
    with ScriptedEndpoint(judge_by_lower_case) as endpoint:
        out = tmp_path / "run"
        result = run_cli(*online_args(tiny_lm, prompts, out, "--judge-url", endpoint.url, "--judge-model", "judge",
                                      "--max-steps", 2, "--batch-size", 4, "--lr", 1e-3))
        assert result.code == 0, result.err
        seen = list(endpoint.seen)
    assert len(seen) == 16 and all(body["model"] == "judge" and body["temperature"] == 0 for body in seen)
    # every pair is shown in both orders (requests run concurrently: compare as a multiset)
    shown = sorted(SHOWN.search(body["messages"][1]["content"]).groups() for body in seen)
    assert shown == sorted(pair[::-1] for pair in shown)
    rows = read_metrics(out)
    for r in rows:
        assert r["judge/decided"] + r["judge/ties"] + r["judge/invalid"] == pytest.approx(1)
        assert r["judge/invalid"] == 0 and r["judge/decided"] > 0
        assert "objective/scores" not in r and math.isfinite(r["rewards/margins"])


def test_a_position_biased_judge_trains_nothing(run_cli, tiny_lm, prompts, tmp_path):
    """A judge that always answers [[A]] contradicts itself on every pair: every pair is a tie, left out
    of the loss, so the loss is 0 and the weights do not move."""
    with ScriptedEndpoint(lambda body: "[[A]]") as endpoint:
        out = tmp_path / "run"
        result = run_cli(*online_args(tiny_lm, prompts, out, "--judge-url", endpoint.url, "--judge-model", "judge",
                                      "--max-steps", 2, "--batch-size", 4, "--lr", 1e-2))
        assert result.code == 0, result.err
    rows = read_metrics(out)
    assert [r["judge/ties"] for r in rows] == [1.0, 1.0]
    assert [r["loss"] for r in rows] == [0.0, 0.0] and rows[-1]["objective/kl"] == pytest.approx(0, abs=1e-5)
    assert_same_params(tiny_lm, out, atol=0)


def test_a_local_judge_model(run_cli, tiny_lm, prompts, tmp_path):
    """--judge-model without --judge-url: a local model through the same backend layer. The random tiny
    model writes no verdict, so every pair is unreadable and left out: loss 0, the weights unchanged."""
    out = tmp_path / "run"
    result = run_cli(*online_args(tiny_lm, prompts, out, "--judge-model", tiny_lm, "--judge-max-new-tokens", 4,
                                  "--max-steps", 1, "--batch-size", 2, "--lr", 1e-2))
    assert result.code == 0, result.err
    (row,) = read_metrics(out)
    assert row["judge/invalid"] == 1 and row["loss"] == 0
    assert_same_params(tiny_lm, out, atol=0)


@pytest.mark.parametrize("extra,message", [
    (["--online", "--reward", "{reward}"], "--prompts is required"),
    (["--online", "--prompts", "{prompts}", "--reward", "{reward}", "--judge-model", "j"],
     "--reward or a judge (--judge-model/--judge-url), not both"),
    (["--online", "--prompts", "{prompts}", "--reward", "{reward}", "--judge-url", "http://127.0.0.1:9/v1"],
     "not both"),
    (["--online", "--prompts", "{prompts}", "--reward", "{reward}", "--data", "{prompts}"],
     "--data is for offline dpo"),
    (["--online", "--prompts", "{prompts}"], "--online needs --reward or --judge-model"),
    (["--online", "--prompts", "{prompts}", "--judge-url", "http://127.0.0.1:9/v1"], "--judge-url needs"),
    (["--online", "--prompts", "{prompts}", "--reward", "{reward}", "--max-new-tokens", 600], "--max-length (512)"),
    (["--online", "--prompts", "{prompts}", "--reward", "{reward}", "--temperature", 0], "--temperature must be"),
    (["--data", "{prompts}", "--reward", "{reward}"], "--reward is for --online"),
    (["--data", "{prompts}", "--reward-gate", "a:0"], "--reward-gate is for --online"),
    (["--data", "{prompts}", "--sample-dtype", "bfloat16"], "--sample-dtype is for --online"),
    (["--online", "--prompts", "{prompts}", "--reward", "{reward}", "--reward-weight", 1, "--reward-weight", 2],
     "--reward-weight: 2 weight(s) for 1 reward(s)"),
])
def test_bad_flags_exit_2_before_loading_a_model(run_cli, no_model_loading, reward_fn, prompts, tmp_path, extra,
                                                 message):
    args = [str(a).format(reward=reward_fn, prompts=prompts) for a in extra]
    result = run_cli("dpo", "--model", "x", "--output", tmp_path / "out", *args)
    assert result.code == 2
    assert any(message in e for e in result.errors), result.err
    assert no_model_loading == []


def test_the_learning_rate_default_depends_on_the_mode(prompts, reward_fn):
    from rlhfkit.config import parse_config
    from rlhfkit.recipes.dpo import OFFLINE_LR, ONLINE_LR, Config

    online = parse_config(Config, ["--online", "--prompts", prompts, "--reward", reward_fn, "--output", "o"])
    offline = parse_config(Config, ["--data", prompts, "--output", "o"])
    given = parse_config(Config, ["--online", "--prompts", prompts, "--reward", reward_fn, "--output", "o",
                                  "--lr", "2e-6"])
    assert (online.lr, offline.lr, given.lr) == (ONLINE_LR, OFFLINE_LR, 2e-6)
