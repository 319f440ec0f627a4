"""``rlhfkit ppo`` through the real CLI on a tiny model: a hand-written reward rises, all three
algorithms run (full and LoRA policies, value head and separate critic), checkpoints hold
loadable policies, resume reproduces the uninterrupted run, bad configs exit 2 before any model
is loaded."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from core_helpers import assert_same_params, read_metrics

TRL_NAMES = ["objective/scores", "objective/kl", "objective/kl_k1", "objective/kl_k2", "objective/kl_k3",
             "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward", "policy/clipfrac_avg",
             "policy/approxkl_avg", "loss/policy_avg", "loss/value_avg", "val/clipfrac_avg", "val/num_eos_tokens",
             "kl_coef", "time/generation", "time/scoring", "time/update"]
COMMON = ["step", "loss", "learning_rate", "grad_norm", "tokens_per_second", "elapsed_s",
          "completions/mean_length", "completions/repeated_ngram_rate"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and on a busy machine threads that wait
    for each other make these runs many times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def ppo_args(policy, reward, prompts, out, *extra) -> list:
    return ["ppo", "--model", policy, "--reward", reward, "--prompts", prompts, "--output", out,
            "--max-new-tokens", 8, "--no-progress", *extra]


def test_ppo_raises_a_hand_written_reward(run_cli, tiny_lm, reward_fn, prompts, tmp_path):
    """30 iterations of 16 prompts, 2 minibatches × 2 epochs: the mean score of the last five
    iterations clearly beats the first five (about 0.1 -> 0.7 for seeds 1-3)."""
    out = tmp_path / "run"
    result = run_cli(*ppo_args(tiny_lm, reward_fn, prompts, out, "--max-steps", 30, "--batch-size", 16,
                               "--minibatch-size", 8, "--ppo-epochs", 2, "--lr", 3e-3, "--lr-schedule", "constant",
                               "--kl-coef", 0.01, "--sample-every", 10, "--save-steps", 15, "--seed", 1))
    assert result.code == 0, result.err
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 31))
    for r in rows:
        for key in TRL_NAMES + COMMON:
            assert isinstance(r[key], (int, float)) and math.isfinite(r[key]), (key, r)
    scores = [r["objective/scores"] for r in rows]
    first, last = sum(scores[:5]) / 5, sum(scores[-5:]) / 5
    assert last > first + 0.15, scores
    assert rows[0]["objective/kl_k1"] == pytest.approx(0, abs=1e-5)  # policy == reference before any update
    assert rows[-1]["objective/kl_k3"] > 0 and rows[-1]["objective/kl_k2"] > 0
    assert all(r["kl_coef"] == 0.01 for r in rows)
    # samples.jsonl: every 10 iterations, one row per completion
    samples = [json.loads(l) for l in (out / "samples.jsonl").read_text().splitlines()]
    assert sorted({s["step"] for s in samples}) == [10, 20, 30] and len(samples) == 3 * 16
    assert {"prompt", "completion", "score", "kl", "length", "has_eos"} <= set(samples[0])
    # policy-N/ snapshots and the final model load with the toolkit's loader
    from rlhfkit.models.loading import load_causal_lm

    assert (out / "checkpoint-15").is_dir() and (out / "checkpoint-30").is_dir()
    for folder in ("policy-15", "policy-30", "."):
        assert load_causal_lm(str(out / folder)).config.model_type == "llama"
    assert_same_params(out / "policy-30", out)


@pytest.mark.parametrize("algo,extra", [
    ("ppo", ["--lora-r", 4, "--target-kl", 0.5, "--kl-horizon", 100, "--whiten-rewards"]),
    ("ppo", ["--value-model", "CRITIC", "--kl-in", "loss", "--kl-estimator", "k2", "--missing-eos-penalty", 1.0,
             "--value-lr", 1e-2]),
    ("rloo", ["--samples-per-prompt", 2, "--score-clip", 0.5]),
    ("grpo", ["--lora-r", 4, "--minibatch-size", 8, "--grad-accum", 2]),
    ("grpo", ["--lora-r", 4, "--sample-dtype", "bfloat16"]),  # rollouts from a bfloat16 copy of a LoRA policy
    ("ppo", ["--sample-dtype", "bfloat16", "--ppo-epochs", 1]),
])
def test_every_algorithm_runs(run_cli, tiny_lm, reward_fn, prompts, tmp_path, algo, extra):
    out = tmp_path / "run"
    extra = [tiny_lm if e == "CRITIC" else e for e in extra]
    result = run_cli(*ppo_args(tiny_lm, reward_fn, prompts, out, "--algo", algo, "--max-steps", 3,
                               "--batch-size", 4, "--lr", 1e-3, *extra))
    assert result.code == 0, result.err
    rows = read_metrics(out)
    assert len(rows) == 3
    for r in rows:
        for key in TRL_NAMES + COMMON:
            assert math.isfinite(r[key]), (key, r)
    assert rows[0]["objective/kl_k1"] == pytest.approx(0, abs=1e-5)  # reference == initial policy (LoRA too)
    assert rows[-1]["grad_norm"] > 0
    if "--target-kl" in extra:
        assert rows[1]["kl_coef"] != rows[0]["kl_coef"]  # the adaptive controller moved β
    if algo != "ppo":
        assert all(r["loss/value_avg"] == 0 for r in rows)
    if "--sample-dtype" in extra and "--lora-r" not in extra:  # one pass over one minibatch: ratio 1 exactly
        assert all(r["val/ratio"] == pytest.approx(1, abs=1e-5) for r in rows)
    saved = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert saved["step"] == 3
    from rlhfkit.models.loading import load_causal_lm

    assert load_causal_lm(str(out / "policy-3")).config.model_type == "llama"
    if "--lora-r" in extra:
        assert (out / "policy-3" / "adapter_config.json").exists()


def test_train_returns_the_rows_checkpoints_and_policy_snapshots(tiny_lm, reward_fn, prompts, tmp_path):
    from rlhfkit.recipes import ppo
    from rlhfkit.training import start_run

    out = tmp_path / "run"
    cfg = ppo.Config(model=tiny_lm, reward=reward_fn, prompts=prompts, output=str(out), max_steps=3, batch_size=4,
                     max_new_tokens=8, save_steps=2, save_total_limit=1, logging_steps=2, progress=False)
    with start_run(cfg) as run:
        result = ppo.train(cfg, run)
    assert result.output == out and result.final_model == out and (out / "config.json").exists()
    assert [r["step"] for r in result.history] == [2, 3] and result.metrics == result.history[-1]
    assert result.history == read_metrics(out)
    assert result.checkpoints == [out / "checkpoint-3"]  # --save-total-limit 1
    assert result.snapshots == [(2, out / "policy-2"), (3, out / "policy-3")]  # snapshots are all kept


def test_save_only_model_writes_the_snapshots_and_no_resume_state(tiny_lm, reward_fn, prompts, tmp_path):
    """--save-only-model: policy-N/ every --save-steps, no checkpoint-N/ (no optimizer, value head or
    RNG state on disk), no snapshot of the last iteration (the final model is it); the same numbers."""
    from rlhfkit.recipes import ppo
    from rlhfkit.training import start_run

    results = {}
    for only_model in (False, True):
        out = tmp_path / f"run-{only_model}"
        cfg = ppo.Config(model=tiny_lm, reward=reward_fn, prompts=prompts, output=str(out), max_steps=3, batch_size=4,
                         max_new_tokens=8, save_steps=1, save_only_model=only_model, progress=False)
        with start_run(cfg) as run:
            results[only_model] = ppo.train(cfg, run)
    lean, full = results[True], results[False]
    assert lean.checkpoints == [] and not list(lean.output.glob("checkpoint-*"))
    assert lean.snapshots == [(1, lean.output / "policy-1"), (2, lean.output / "policy-2")]
    assert [s for s, _ in full.snapshots] == [1, 2, 3]
    assert_same_params(lean.output / "policy-2", full.output / "policy-2", atol=0)
    assert_same_params(lean.output, full.output, atol=0)
    assert lean.history == [{**row, **{k: lean.history[i][k] for k in row if k.startswith("time/") or k in
                                       ("elapsed_s", "tokens_per_second")}} for i, row in enumerate(full.history)]


@pytest.mark.parametrize("extra", [[], ["--lora-r", 4, "--algo", "rloo", "--samples-per-prompt", 2],
                                   ["--ptx-data", "DEMOS", "--ptx-coef", 0.5, "--ptx-batch-size", 2,
                                    "--minibatch-size", 2]])
def test_resume_reproduces_the_uninterrupted_run(run_cli, tiny_lm, reward_fn, prompts, sft_toy, tmp_path, extra):
    """4 iterations in one go == 2 iterations, then --resume for the other 2: same parameters,
    same metrics rows (sampling, minibatch order and the PPO-ptx demonstrations are seeded per
    iteration; the optimizer, schedule, value head and adaptive KL coefficient come from checkpoint-2)."""
    extra = [sft_toy if e == "DEMOS" else e for e in extra]
    common = ["--max-steps", 4, "--batch-size", 4, "--lr", 1e-3, "--save-steps", 2, "--save-total-limit", 0,
              "--target-kl", 0.5, "--kl-horizon", 50, "--sample-every", 1, *extra]
    full, part = tmp_path / "full", tmp_path / "part"
    assert run_cli(*ppo_args(tiny_lm, reward_fn, prompts, full, *common)).code == 0
    # the interrupted run: what the first run had written after its second iteration
    part.mkdir()
    shutil.copytree(full / "checkpoint-2", part / "checkpoint-2")
    for name in ("metrics.jsonl", "samples.jsonl"):
        rows = [l for l in (full / name).read_text().splitlines() if json.loads(l)["step"] <= 2]
        (part / name).write_text("".join(r + "\n" for r in rows))
    assert run_cli(*ppo_args(tiny_lm, reward_fn, prompts, part, *common, "--resume")).code == 0
    assert_same_params(full / "policy-4", part / "policy-4", atol=1e-6)
    assert_same_params(full / "checkpoint-4", part / "checkpoint-4", atol=1e-6)  # value head and all
    timing = ("elapsed_s", "tokens_per_second")
    drop = lambda r: {k: v for k, v in r.items() if not k.startswith("time/") and k not in timing}
    a, b = read_metrics(full), read_metrics(part)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for row_a, row_b in zip(a, b):
        assert drop(row_b) == pytest.approx(drop(row_a), abs=1e-6)
    assert a[2]["kl_coef"] != a[1]["kl_coef"]  # β moved, and the resumed run continued from the saved β
    assert (full / "samples.jsonl").read_text().count("\n") == (part / "samples.jsonl").read_text().count("\n")


@pytest.mark.parametrize("extra,message", [
    (["--algo", "grpo", "--samples-per-prompt", 1], "--samples-per-prompt >= 2"),
    (["--minibatch-size", 3], "--minibatch-size 3 must divide"),
    (["--temperature", 0], "--temperature must be > 0"),
    (["--top-p", 1.5], "--top-p"),
    (["--max-new-tokens", 600], "--max-length (512) must exceed"),
    (["--algo", "rloo", "--value-model", "some/critic"], "--value-model is for --algo ppo"),
    (["--algo", "grpo", "--value-lr", 1e-3], "--value-lr is for --algo ppo"),
    (["--value-lr", -1], "--value-lr must be >= 0"),
    (["--cliprange", 0], "--cliprange must be > 0"),
    (["--lam", 1.5], "--lam must be in [0, 1]"),
    (["--kl-coef", -1], "--kl-coef must be >= 0"),
    (["--grad-accum", 3], "--grad-accum 3 must divide"),
    (["--policy", "other"], "--policy 'other' contradicts --model 'x'"),
    (["--ptx-coef", 0.5], "--ptx-coef > 0 and --ptx-data go together"),
    (["--ptx-data", "PROMPTS"], "--ptx-coef > 0 and --ptx-data go together"),
    (["--ptx-data", "nope.jsonl", "--ptx-coef", 1], "--ptx-data: no such file"),
    (["--ptx-coef", -1], "--ptx-coef must be >= 0"),
    (["--reward", "REWARD2", "--reward-weight", 1], "--reward-weight: 1 weight(s) for 2 reward(s)"),
    (["--reward-weight", 1, 2], "--reward-weight: 2 weight(s) for 1 reward(s)"),
    (["--reward", "REWARD2", "--reward-gate", "safety:0.1"], "no reward named 'safety'"),
    (["--reward", "REWARD2", "--reward-gate", "upper"], "expected NAME:THRESHOLD"),
])
def test_bad_config_exits_2_before_loading_a_model(run_cli, no_model_loading, reward_fn, prompts, tmp_path,
                                                   extra, message):
    extra = [{"PROMPTS": prompts, "REWARD2": reward_fn.replace(":lower", ":upper")}.get(e, e) for e in extra]
    result = run_cli("ppo", "--model", "x", "--reward", reward_fn, "--prompts", prompts, "--output", tmp_path,
                     *extra)
    assert result.code == 2
    assert any(message in e for e in result.errors), result.err
    assert no_model_loading == []


def test_missing_inputs_are_reported_together(run_cli, no_model_loading, tmp_path):
    result = run_cli("ppo", "--output", tmp_path, "--prompts", tmp_path / "nope.jsonl", "--reward",
                     tmp_path / "nope.py:f")
    assert result.code == 2
    assert any("--prompts: no such file" in e for e in result.errors)
    assert any("no such file" in e and "nope.py" in e for e in result.errors)
    assert no_model_loading == []


def test_policy_data_and_rollout_batch_size_are_deprecated_aliases(prompts, reward_fn, capsys):
    from rlhfkit.config import parse_config
    from rlhfkit.recipes.ppo import Config

    cfg = parse_config(Config, ["--policy", "m", "--data", prompts, "--reward", reward_fn, "--output", "o",
                                "--rollout-batch-size", "3"])
    assert (cfg.model, cfg.prompts, cfg.generation_batch_size) == ("m", prompts, 3)
    assert capsys.readouterr().err.splitlines() == [
        "note: --policy is deprecated; use --model", "note: --data is deprecated; use --prompts",
        "note: --rollout-batch-size is deprecated; use --generation-batch-size"]
    grpo = Config(prompts=prompts, output="o", reward=reward_fn, algo="grpo")
    assert (grpo.samples_per_prompt, grpo.kl_estimator, grpo.kl_in) == (4, "k3", "loss")
    ppo = Config(prompts=prompts, output="o", reward=reward_fn)
    assert (ppo.samples_per_prompt, ppo.kl_estimator, ppo.kl_in) == (1, "k1", "reward")


def test_ppo_epochs_default_is_one_pass_for_grpo_and_rloo_four_for_ppo(run_cli, tiny_lm, reward_fn, prompts,
                                                                        tmp_path):
    """GRPO/RLOO default to TRL's num_iterations=1, PPO keeps InstructGPT's 4; an explicit flag wins, and
    config.yaml saves the resolved value."""
    import yaml

    from rlhfkit.config import parse_config
    from rlhfkit.recipes.ppo import Config

    base = ["--prompts", prompts, "--reward", reward_fn, "--output", str(tmp_path / "o")]
    resolved = {algo: parse_config(Config, base + ["--algo", algo]).ppo_epochs for algo in ("ppo", "rloo", "grpo")}
    assert resolved == {"ppo": 4, "rloo": 1, "grpo": 1}
    explicit = {algo: parse_config(Config, base + ["--algo", algo, "--ppo-epochs", "2"]).ppo_epochs
                for algo in ("ppo", "rloo", "grpo")}
    assert explicit == {"ppo": 2, "rloo": 2, "grpo": 2}
    assert Config(prompts=prompts, output="o", reward=reward_fn, algo="grpo", ppo_epochs=3).ppo_epochs == 3
    out = tmp_path / "grpo"
    result = run_cli(*ppo_args(tiny_lm, reward_fn, prompts, out, "--algo", "grpo", "--max-steps", 1,
                               "--batch-size", 2, "--samples-per-prompt", 2))
    assert result.code == 0, result.err
    assert yaml.safe_load((out / "config.yaml").read_text())["ppo_epochs"] == 1
    assert read_metrics(out)[0]["step"] == 1


def run_train(tmp_path, name: str, **overrides):
    from rlhfkit.recipes import ppo
    from rlhfkit.training import start_run

    cfg = ppo.Config(output=str(tmp_path / name), max_new_tokens=8, progress=False, **overrides)
    with start_run(cfg) as run:
        return ppo.train(cfg, run)


def test_ptx_adds_gamma_times_the_sft_loss_of_the_demonstrations(tiny_lm, reward_fn, prompts, sft_toy, tmp_path):
    """PPO-ptx on one iteration, one epoch, one minibatch, every demonstration in the batch:
    loss/ptx_avg is sft's loss of the demonstrations on the initial policy (computed here with the
    sft recipe's own encoder and loss), the step's loss is the plain PPO loss + γ × it, and with
    γ = 0 the run equals plain PPO parameter for parameter."""
    from rlhfkit.data.schema import load_sft
    from rlhfkit.models.loading import load_causal_lm, load_tokenizer
    from rlhfkit.recipes import sft

    common = dict(model=tiny_lm, reward=reward_fn, prompts=prompts, max_steps=1, batch_size=4, ppo_epochs=1,
                  lr=1e-2)
    plain = run_train(tmp_path, "plain", **common).metrics
    zero = run_train(tmp_path, "zero", **common, ptx_data=sft_toy, ptx_coef=0.0, ptx_batch_size=16).metrics
    ptx = run_train(tmp_path, "ptx", **common, ptx_data=sft_toy, ptx_coef=0.5, ptx_batch_size=16).metrics

    tokenizer = load_tokenizer(tiny_lm)
    rows = [[e] for e in sft.encode_examples(tokenizer, load_sft(sft_toy), sft.Config(data=sft_toy))]
    by_hand = sft.evaluate(load_causal_lm(tiny_lm), rows, tokenizer.pad_token_id, batch_size=16)["eval/loss"]
    assert by_hand > 1.0  # a random tiny model: about log(vocabulary)
    assert zero["loss/ptx_avg"] == pytest.approx(by_hand, rel=1e-5)
    assert ptx["loss/ptx_avg"] == pytest.approx(by_hand, rel=1e-5)
    assert "loss/ptx_avg" not in plain
    assert ptx["loss"] == pytest.approx(plain["loss"] + 0.5 * by_hand, rel=1e-5)
    assert zero["loss"] == plain["loss"]
    assert_same_params(tmp_path / "zero", tmp_path / "plain", atol=0)
    with pytest.raises(AssertionError):
        assert_same_params(tmp_path / "ptx", tmp_path / "plain", atol=1e-6)


def test_several_rewards_log_each_component(run_cli, tiny_lm, reward_fn, prompts, tmp_path):
    """--reward twice with weights: objective/scores is the weighted sum of the logged components'
    means (a mean is linear); a gate above every score makes objective/scores the gated one's."""
    upper = reward_fn.replace(":lower", ":upper")
    out = tmp_path / "run"
    result = run_cli(*ppo_args(tiny_lm, reward_fn, prompts, out, "--reward", f"caps={upper}", "--reward-weight", 2,
                               "--reward-weight", -1, "--max-steps", 2, "--batch-size", 4))
    assert result.code == 0, result.err
    for row in read_metrics(out):
        lower, caps = row["objective/scores/lower"], row["objective/scores/caps"]
        assert lower > 0 and caps >= 0
        assert row["objective/scores"] == pytest.approx(2 * lower - caps, abs=1e-6)
    gated = tmp_path / "gated"
    result = run_cli(*ppo_args(tiny_lm, reward_fn, prompts, gated, "--reward", f"caps={upper}",
                               "--reward-gate", "caps:2", "--max-steps", 1, "--batch-size", 4))
    assert result.code == 0, result.err
    row = read_metrics(gated)[0]
    assert row["objective/scores"] == pytest.approx(row["objective/scores/caps"], abs=1e-6)  # every caps < 2
    assert row["objective/scores"] != pytest.approx(row["objective/scores/lower"] + row["objective/scores/caps"])
