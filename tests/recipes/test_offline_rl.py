"""`rlhfkit offline-rl` on a tiny random model: every algo through the real CLI, only positive
advantages training A-LoL, the reference options, exact resume, scoring with --reward, bad input;
the cross-fitted value head and the pieces it reads (prompt features, per-token log-probs)."""

from __future__ import annotations

import json
import math
import shutil
import typing
from pathlib import Path

import pytest
import torch

from core_helpers import assert_same_params, read_metrics, write_jsonl
from rlhfkit.losses import OFFLINE_LOSSES
from rlhfkit.models.loading import load_causal_lm
from rlhfkit.models.packed import Group, packed_forward, padded_forward
from rlhfkit.models.tiny import make_tiny_causal_lm
from rlhfkit.recipes import offline_rl
from rlhfkit.rl.value import fit_prompt_values, prompt_features

pytestmark = pytest.mark.usefixtures("one_thread")

# Two completions per prompt scored +1 and −1: every prompt's mean reward is 0 and its features are
# shared by both, so the value head is exactly 0 (the constant fit and every ridge fit agree: the
# targets cancel within each prompt) and A = r: the "good" half has A = 1, the "bad" half A = −1.
GOOD_BAD = [row for i in range(6) for row in (
    {"prompt": f"question {i}", "completion": f"good answer {i}", "reward": 1.0},
    {"prompt": f"question {i}", "completion": f"bad {i}", "reward": -1.0})]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return Path(make_tiny_causal_lm(tmp_path_factory.mktemp("tiny") / "model", seed=0))


@pytest.fixture(scope="module")
def good_bad(tmp_path_factory) -> Path:
    return Path(write_jsonl(tmp_path_factory.mktemp("data") / "good_bad.jsonl", GOOD_BAD))


def run_offline(run_cli, tiny, data, out, *extra) -> list[dict]:
    result = run_cli("offline-rl", "--model", tiny, "--data", data, "--output", out, "--batch-size", "3",
                     "--lr", "1e-3", "--no-progress", *extra)
    assert result.code == 0, result.err
    return read_metrics(out)


def test_algo_flag_lists_every_registered_loss():
    assert set(typing.get_args(typing.get_type_hints(offline_rl.Config)["algo"])) == set(OFFLINE_LOSSES)


def test_alol_trains_only_the_positive_advantages(run_cli, tiny, good_bad, tmp_path):
    rows = run_offline(run_cli, tiny, good_bad, tmp_path / "out", "--max-steps", "3", "--batch-size", "6")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("loss", "learning_rate", "grad_norm", "tokens_per_second", "logps/policy", "logps/ref",
                "offline/log_ratio", "offline/importance_weight_mean", "offline/clipfrac", "value/var_explained"):
        assert all(math.isfinite(r[key]) for r in rows), key
    for r in rows:
        # only the six "good" completions (A = r − V = 1 − 0) are in the data order
        assert r["offline/kept_fraction"] == 0.5
        assert r["offline/reward_mean"] == 1.0 and r["offline/advantage_mean"] == 1.0
        assert r["value/mse"] == pytest.approx(1.0)
    first = rows[0]
    # π = π_ref at step 0: weight 1, log-ratio 0, so the loss is −A·1·log π(y|x) = −logps/policy
    assert first["offline/importance_weight_mean"] == pytest.approx(1.0, abs=1e-5)
    assert first["offline/log_ratio"] == pytest.approx(0.0, abs=1e-4)
    assert first["loss"] == pytest.approx(-first["logps/policy"], rel=1e-5)
    # every step holds the same six examples: they became likelier
    assert rows[-1]["logps/policy"] > first["logps/policy"] + 1
    assert (tmp_path / "out" / "checkpoint-3").is_dir() and list((tmp_path / "out").glob("offline-ref-*.pt"))
    assert load_causal_lm(str(tmp_path / "out")).config.model_type == "llama"


def test_awr_weights_every_example(run_cli, tiny, good_bad, tmp_path):
    """One step over all twelve examples at β = 0.5: weights e^{±2}, mean cosh 2 = 3.762196."""
    rows = run_offline(run_cli, tiny, good_bad, tmp_path / "out", "--algo", "awr", "--max-steps", "1",
                       "--batch-size", "12", "--awr-beta", "0.5")
    assert rows[0]["offline/awr_weight_mean"] == pytest.approx(math.cosh(2.0), rel=1e-6)
    assert rows[0]["offline/reward_mean"] == pytest.approx(0.0) and rows[0]["offline/kept_fraction"] == 0.5
    assert "offline/importance_weight_mean" not in rows[0]


def test_alol_seq_with_eval_data(run_cli, tiny, good_bad, tmp_path):
    rows = run_offline(run_cli, tiny, good_bad, tmp_path / "out", "--algo", "alol-seq", "--max-steps", "2",
                       "--eval-data", good_bad)
    assert rows[0]["offline/importance_weight_mean"] == pytest.approx(1.0, abs=1e-5)
    last = rows[-1]
    assert last["eval/offline/kept_fraction"] == 0.5
    assert last["eval/offline/reward_mean"] == pytest.approx(0.0)  # means over every eval example
    assert math.isfinite(last["eval/loss"]) and last["eval/loss"] > 0
    assert "eval/loss" not in rows[0]


def test_equal_rewards_train_nothing(run_cli, tiny, tmp_path):
    data = write_jsonl(tmp_path / "flat.jsonl", [{**r, "reward": 0.1} for r in GOOD_BAD])
    rows = run_offline(run_cli, tiny, data, tmp_path / "out")
    assert rows == [{"step": 0, "loss": 0.0, "offline/kept_fraction": 0.0, "value/mse": 0.0,
                     "value/var_explained": 0.0}]
    before = {k: v for k, v in load_causal_lm(str(tiny)).state_dict().items()}
    after = load_causal_lm(str(tmp_path / "out")).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_lora_and_another_reference(run_cli, tiny, good_bad, tmp_path):
    # LoRA: the reference is the base model with the adapters off, so π = π_ref at step 0
    rows = run_offline(run_cli, tiny, good_bad, tmp_path / "lora", "--max-steps", "2", "--lora-r", "4",
                       "--lr", "1e-2")
    assert rows[0]["offline/log_ratio"] == pytest.approx(0.0, abs=1e-4)
    assert rows[1]["offline/log_ratio"] > 1e-3
    assert "adapter_model.safetensors" in {p.name for p in (tmp_path / "lora").iterdir()}
    other = make_tiny_causal_lm(tmp_path / "ref", seed=1)
    rows = run_offline(run_cli, tiny, good_bad, tmp_path / "other", "--max-steps", "1", "--ref-model", other)
    assert abs(rows[0]["offline/log_ratio"]) > 1e-2


def test_resume_equals_uninterrupted_and_reuses_the_reference(run_cli, tiny, good_bad, tmp_path):
    args = ("--max-steps", "4", "--save-steps", "2", "--save-total-limit", "0", "--batch-size", "2")
    full = run_offline(run_cli, tiny, good_bad, tmp_path / "full", *args)
    out = tmp_path / "resumed"
    run_offline(run_cli, tiny, good_bad, out, *args)
    shutil.rmtree(out / "checkpoint-4")  # the run died after step 2
    (out / "model.safetensors").unlink()
    result = run_cli("offline-rl", "--model", tiny, "--data", good_bad, "--output", out, "--lr", "1e-3",
                     "--no-progress", *args, "--resume")
    assert result.code == 0, result.err
    assert "reusing offline-ref-" in result.out
    resumed = read_metrics(out)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(full, resumed):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    assert_same_params(tmp_path / "full", out)


def test_pairs_scored_by_a_reward_function(run_cli, tiny, tmp_path):
    """Each side of a pair is a completion, scored by --reward (here +1 for "good", −1 otherwise)."""
    scorer = tmp_path / "score.py"
    scorer.write_text("def reward(prompts, completions):\n"
                      "    return [1.0 if 'good' in c else -1.0 for c in completions]\n")
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"question {i}", "chosen": f"good answer {i}",
                                                    "rejected": f"bad {i}"} for i in range(6)])
    rows = run_offline(run_cli, tiny, pairs, tmp_path / "out", "--max-steps", "1", "--reward", f"{scorer}:reward")
    assert rows[0]["offline/kept_fraction"] == 0.5 and rows[0]["offline/reward_mean"] == 1.0


@pytest.mark.parametrize("record, message", [
    ({"prompt": "p", "completion": "c"}, "data.jsonl:1: field 'reward': missing field (or pass --reward"),
    ({"prompt": "p", "completion": "c", "reward": "high"}, "data.jsonl:1: field 'reward': expected a finite number"),
    ({"prompt": "p", "completion": "c", "reward": float("nan")}, "data.jsonl:1: field 'reward': expected a finite"),
    ({"prompt": "p", "completions": ["a", "b"], "ranking": [0, 1]}, "data.jsonl:1: field 'completions': a ranking"),
    ({"prompt": "p", "reward": 1.0}, "data.jsonl:1: field 'completion': missing field"),
    ({"prompt": "p", "chosen": "a", "rejected": "b"}, "data.jsonl:1: field 'reward': missing field"),
])
def test_bad_records_exit_2_before_any_model_loads(run_cli, tiny, tmp_path, no_model_loading, record, message):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps(record) + "\n")
    result = run_cli("offline-rl", "--model", tiny, "--data", data, "--output", tmp_path / "o")
    assert result.code == 2
    assert any(message in line for line in result.errors), result.err
    assert no_model_loading == []


@pytest.mark.parametrize("argv, message", [
    (["--clip", "1.5"], "--clip must be in (0, 1)"),
    (["--awr-beta", "0"], "--awr-beta must be > 0"),
    (["--value-folds", "1"], "--value-folds must be >= 2"),
    (["--reward", "nope.py:f"], "no such file: nope.py"),
])
def test_bad_flags_exit_2(run_cli, tiny, good_bad, tmp_path, no_model_loading, argv, message):
    result = run_cli("offline-rl", "--model", tiny, "--data", good_bad, "--output", tmp_path / "o", *argv)
    assert result.code == 2
    assert message in result.err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------ the value head


def test_value_head_is_cross_fitted_over_prompts():
    """Two prompts, folds = 2: each prompt's value is fitted on the other one alone (a ridge fit on
    one prompt's features is its mean: the centred features are 0). Prompt A's rewards [1, 3],
    prompt B's [10]: V(A) = 10, V(B) = 2 (an in-sample head would give A its own mean 2).
    MSE = ((10 − 1)² + (10 − 3)² + (2 − 10)²)/3 = 64.6667; Var(r) = 14.8889 → explained −3.3433.
    New prompts get the head refitted on both: the mean 14/3."""
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    fit = fit_prompt_values(features, [0, 0, 1], torch.tensor([1.0, 3.0, 10.0]), folds=2)
    torch.testing.assert_close(fit.values, torch.tensor([10.0, 10.0, 2.0], dtype=torch.float64))
    assert fit.mse == pytest.approx(64.666667)
    assert fit.var_explained == pytest.approx(1 - 64.666667 / 14.888889, abs=1e-6)
    torch.testing.assert_close(fit.predict(torch.zeros(1, 2)), torch.tensor([14 / 3], dtype=torch.float64))


def test_value_head_learns_a_linear_reward_and_ignores_noise():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(60, 8, generator=g)
    prompt_of = [p for p in range(60) for _ in range(3)]
    truth = features[:, 0] * 2.0 - features[:, 3]
    rewards = truth[prompt_of] + 0.1 * torch.randn(180, generator=g)
    fit = fit_prompt_values(features, prompt_of, rewards, folds=5, seed=0)
    assert fit.var_explained > 0.95 and math.isfinite(fit.ridge)
    assert fit.mse < 0.05
    noise = torch.randn(180, generator=g)
    fit = fit_prompt_values(features, prompt_of, noise, folds=5, seed=0)
    assert fit.var_explained < 0.05  # nothing to learn: the held-out fit is no better than the mean


def test_equal_rewards_have_zero_advantage_exactly():
    rewards = torch.full((5,), 0.1)
    fit = fit_prompt_values(torch.randn(5, 4), list(range(5)), rewards)
    assert torch.equal(rewards.double() - fit.values, torch.zeros(5, dtype=torch.float64))


def test_prompt_features_are_each_prompts_last_hidden_state(tiny):
    model = load_causal_lm(str(tiny)).eval()
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12]]
    batch = prompt_features(model, prompts)
    for row, prompt in zip(batch, prompts):
        with torch.no_grad():
            alone = model(torch.tensor([prompt]), output_hidden_states=True).hidden_states[-1][0, -1]
        torch.testing.assert_close(row, alone, atol=1e-5, rtol=1e-5)


def test_per_token_logps_of_the_packed_and_padded_paths(tiny):
    model = load_causal_lm(str(tiny))
    groups = [Group([3, 4, 5], [[6, 7], [8, 9, 10]]), Group([11], [[12, 13, 14, 15]], [[True, False, True, True]])]
    packed, padded = packed_forward(model, groups), padded_forward(model, groups)
    torch.testing.assert_close(packed.token_logps, padded.token_logps, atol=1e-5, rtol=1e-5)
    logps, mask = packed.per_token()
    assert mask.tolist() == [[True, True, False], [True, True, True], [True, True, True]]
    torch.testing.assert_close((logps * mask).sum(-1), packed.logps, atol=1e-5, rtol=1e-5)
