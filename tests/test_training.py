"""The shared training core: the data order, checkpoints, and the equivalences it promises --
a run interrupted and resumed equals the uninterrupted run (SFT, RM, LoRA), interrupted saves are
ignored, and gradient accumulation does not change the result."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from core_helpers import assert_same_params, read_metrics
from rlhfkit.training import MetricsLogger, StepPlan, latest_checkpoint, list_checkpoints

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ data order


def _plan(n=10, batch=2, accum=2, world=1, seed=3, total=5):
    return StepPlan(n, batch, accum, world, seed, total)


def test_each_epoch_is_a_permutation_and_epochs_differ():
    plan = _plan(n=12, batch=3, accum=1)
    epoch0 = [i for s in range(4) for i in plan.global_indices(s)]
    epoch1 = [i for s in range(4, 8) for i in plan.global_indices(s)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(12))
    assert epoch0 != epoch1
    assert plan.global_indices(2) == _plan(n=12, batch=3, accum=1).global_indices(2)  # pure function of step
    assert plan.global_indices(2) != _plan(n=12, batch=3, accum=1, seed=4).global_indices(2)


def test_a_step_may_straddle_two_epochs():
    plan = _plan(n=5, batch=4, accum=1)
    order0, order1 = plan._epoch_order(0), plan._epoch_order(1)
    assert plan.global_indices(1) == order0[4:] + order1[:3]
    assert plan.epoch_at(2) == pytest.approx(8 / 5)


def test_ranks_and_microbatches_partition_the_global_batch():
    """2 ranks x 2 micro-batches of 2 see exactly what 1 rank x 1 micro-batch of 8 sees."""
    split = _plan(n=20, batch=2, accum=2, world=2)
    whole = _plan(n=20, batch=8, accum=1, world=1)
    for step in range(4):
        pieces = [mb for rank in range(2) for mb in split.local_microbatches(step, rank)]
        assert [len(mb) for mb in pieces] == [2, 2, 2, 2]
        assert [i for mb in pieces for i in mb] == whole.global_indices(step) == whole.local_microbatches(step, 0)[0]


def test_total_steps_from_epochs():
    class Cfg:
        batch_size, grad_accum, max_steps, epochs, seed = 4, 2, 0, 1.5, 0

    assert StepPlan.from_config(Cfg, num_examples=20, world_size=1).total_steps == 4  # ceil(30 / 8)
    assert StepPlan.from_config(Cfg, num_examples=20, world_size=2).total_steps == 2  # ceil(30 / 16)
    Cfg.max_steps = 7
    assert StepPlan.from_config(Cfg, num_examples=20, world_size=2).total_steps == 7


# ------------------------------------------------------------------ checkpoints and metrics files


def test_only_complete_checkpoints_count(tmp_path):
    for name, complete in [("checkpoint-2", True), ("checkpoint-10", True), ("checkpoint-9", True),
                           ("checkpoint-11", False), (".tmp-checkpoint-12", True), ("checkpoint-x", True)]:
        (tmp_path / name).mkdir()
        if complete:
            (tmp_path / name / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-13").write_text("a file, not a folder")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-9", "checkpoint-10"]
    assert latest_checkpoint(tmp_path).name == "checkpoint-10"
    assert latest_checkpoint(tmp_path / "missing") is None


def test_metrics_logger_appends_and_truncates(tmp_path):
    log = MetricsLogger(tmp_path)
    for step in range(1, 6):
        log.log({"step": step, "loss": float(step)})
    log.truncate_after(3)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    MetricsLogger(tmp_path, append=True).log({"step": 4, "loss": 4.0})
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]
    MetricsLogger(tmp_path)  # a fresh run starts a fresh file
    assert not (tmp_path / "metrics.jsonl").exists()


# ------------------------------------------------------------------ resume equivalence


def _interrupt_after_logging(monkeypatch, at_step: int):
    """Simulate a kill right after the metrics row of ``at_step`` was written."""
    original = MetricsLogger.log

    def log(self, row):
        original(self, row)
        if row.get("step") == at_step:
            raise KeyboardInterrupt

    monkeypatch.setattr(MetricsLogger, "log", log)


def _leave_a_broken_save_behind(output: Path, source: Path) -> None:
    """What a kill during a save leaves: a half-written temporary folder, and a checkpoint folder
    without trainer_state.json (and garbage weights). --resume must ignore both."""
    tmp = output / ".tmp-checkpoint-5"
    shutil.copytree(source, tmp)
    (tmp / "trainer_state.json").write_text(json.dumps({"step": 5}))
    partial = output / "checkpoint-4"
    shutil.copytree(source, partial)
    (partial / "trainer_state.json").unlink()
    (partial / "model.safetensors").write_bytes(b"truncated")


RESUME_CASES = {
    "sft": ["sft", "--lr", "2e-2"],
    "rm": ["rm", "--lr", "1e-2"],
    "sft-lora": ["sft", "--lr", "5e-2", "--lora-r", "4"],
    "rm-lora": ["rm", "--lr", "1e-2", "--lora-r", "2"],
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resumed_run_equals_uninterrupted_run(case, run_cli, monkeypatch, tiny_lm, sft_toy, pairs_train, tmp_path):
    command, *extra = RESUME_CASES[case]
    data = sft_toy if command == "sft" else pairs_train
    args = [command, "--model", tiny_lm, "--data", data, "--max-steps", "6", "--save-steps", "3",
            "--batch-size", "3", "--no-progress", *extra]
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert run_cli(*args, "--output", whole).code == 0

    with monkeypatch.context() as m:
        _interrupt_after_logging(m, at_step=5)
        result = run_cli(*args, "--output", broken)
    assert result.code == 130 and "interrupted" in result.err
    assert [p.name for p in list_checkpoints(broken)] == ["checkpoint-3"]
    assert [r["step"] for r in read_metrics(broken)] == [1, 2, 3, 4, 5]
    _leave_a_broken_save_behind(broken, broken / "checkpoint-3")

    result = run_cli(*args, "--output", broken, "--resume")
    assert result.code == 0, result.err
    assert f"resumed from {broken / 'checkpoint-3'} (step 3)" in result.out

    assert_same_params(whole, broken, atol=1e-6)
    assert_same_params(whole / "checkpoint-6", broken / "checkpoint-6", atol=1e-6)
    rows_whole, rows_resumed = read_metrics(whole), read_metrics(broken)
    assert [r["step"] for r in rows_resumed] == [1, 2, 3, 4, 5, 6]  # rows 4-5 re-logged once, not twice
    for a, b in zip(rows_whole, rows_resumed):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
        assert a["learning_rate"] == pytest.approx(b["learning_rate"], abs=1e-12)
    if "--lora-r" in extra and command == "sft":
        assert (broken / "adapter_model.safetensors").exists()


def test_resume_without_a_checkpoint_starts_over_cleanly(run_cli, tiny_lm, sft_toy, tmp_path):
    """A run killed before its first checkpoint, restarted with --resume: no stale metrics rows."""
    out = tmp_path / "o"
    out.mkdir()
    (out / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 99.0}) + "\n")
    (out / ".tmp-checkpoint-2").mkdir()
    result = run_cli("sft", "--model", tiny_lm, "--data", sft_toy, "--output", out, "--max-steps", "2",
                     "--batch-size", "2", "--resume", "--no-progress")
    assert result.code == 0, result.err
    assert "no checkpoint" in result.out
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["loss"] != 99.0


def test_resume_of_a_finished_run_changes_nothing(run_cli, tiny_lm, pairs_train, tmp_path):
    out = tmp_path / "o"
    args = ["rm", "--model", tiny_lm, "--data", pairs_train, "--output", out, "--max-steps", "2", "--batch-size", "4",
            "--lr", "1e-2", "--no-progress"]
    assert run_cli(*args).code == 0
    shutil.copytree(out, tmp_path / "before")
    assert run_cli(*args, "--resume").code == 0
    assert_same_params(tmp_path / "before", out, atol=0)
    assert [r["step"] for r in read_metrics(out)] == [1, 2]


# ------------------------------------------------------------------ gradient accumulation


@pytest.mark.parametrize("command", ["sft", "rm"])
def test_gradient_accumulation_is_invariant(command, run_cli, tiny_lm, sft_toy, pairs_train, tmp_path):
    """batch 4 x accum 1 and batch 2 x accum 2 (same global batch) end with the same parameters.
    SFT examples differ in length: this holds only because the loss is divided by the trained
    tokens of the whole global batch, not averaged per micro-batch."""
    data = sft_toy if command == "sft" else pairs_train
    common = [command, "--model", tiny_lm, "--data", data, "--max-steps", "3", "--lr", "2e-2", "--no-progress"]
    assert run_cli(*common, "--batch-size", "4", "--grad-accum", "1", "--output", tmp_path / "a").code == 0
    assert run_cli(*common, "--batch-size", "2", "--grad-accum", "2", "--output", tmp_path / "b").code == 0
    assert run_cli(*common, "--batch-size", "1", "--grad-accum", "4", "--output", tmp_path / "c").code == 0
    # float noise from different padding and summation order is ~1e-6 after Adam's normalised steps;
    # averaging per micro-batch instead (the classic bug) moves SFT parameters by ~1e-1 here
    assert_same_params(tmp_path / "a", tmp_path / "b", atol=1e-5)
    assert_same_params(tmp_path / "a", tmp_path / "c", atol=1e-5)
    losses = [[r["loss"] for r in read_metrics(tmp_path / x)] for x in "abc"]
    assert losses[0] == pytest.approx(losses[1], abs=1e-5) and losses[0] == pytest.approx(losses[2], abs=1e-5)


def test_optimizer_gives_named_parameters_their_own_learning_rate():
    """PPO's value head learns at --value-lr; the scheduler scales both groups alike."""
    from torch import nn

    from rlhfkit.training import make_optimizer, make_scheduler

    model = nn.ModuleDict({"policy": nn.Linear(3, 3), "value_head": nn.Linear(3, 1)})
    optimizer = make_optimizer(model, 1e-5, lr_by_prefix={"value_head.": 1e-3})
    by_lr = {g["lr"]: sum(p.numel() for p in g["params"]) for g in optimizer.param_groups}
    assert by_lr == {1e-5: 12, 1e-3: 4}
    assert optimizer.param_groups[0]["lr"] == 1e-5  # the base group first
    scheduler = make_scheduler(optimizer, "linear", 10, 0.0)
    optimizer.step()
    scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.9e-5, 0.9e-3])
    assert len(make_optimizer(model, 1e-5).param_groups) == 1


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"),
                                     RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos; "
                                                  "PytorchStreamWriter failed writing file data/0")])
def test_a_full_disk_during_a_checkpoint_is_a_clear_error(run_cli, monkeypatch, tiny_lm, sft_toy, tmp_path, failure):
    """Exit 2 with one line naming the checkpoint, no traceback, no half-written folder left."""
    from accelerate import Accelerator

    def full_disk(self, output_dir, **kwargs):
        Path(output_dir).mkdir(parents=True)
        (Path(output_dir) / "model.safetensors").write_bytes(b"partial")
        raise failure

    monkeypatch.setattr(Accelerator, "save_state", full_disk)
    out = tmp_path / "o"
    result = run_cli("sft", "--model", tiny_lm, "--data", sft_toy, "--output", out, "--max-steps", "2",
                     "--batch-size", "2", "--save-steps", "1", "--no-progress")
    assert result.code == 2
    assert "checkpoint-1: cannot write the checkpoint" in result.err and "--resume" in result.err
    assert "Traceback" not in result.err
    assert not list(out.glob(".tmp-*")) and not list(out.glob("checkpoint-*"))


def test_save_only_model_checkpoints_load_and_refuse_to_resume(run_cli, tiny_lm, sft_toy, tmp_path):
    """--save-only-model: checkpoint-N/ is a transformers folder (no optimizer.bin, no RNG state), none
    after the last step; a later --resume on that folder is refused with the reason, exit 2."""
    import json

    from transformers import AutoModelForCausalLM

    out = tmp_path / "o"
    args = ("sft", "--model", tiny_lm, "--data", sft_toy, "--output", out, "--max-steps", "3", "--batch-size", "2",
            "--save-steps", "1", "--save-total-limit", "2", "--no-progress")
    assert run_cli(*args, "--save-only-model").code == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    saved = out / "checkpoint-2"
    assert json.loads((saved / "trainer_state.json").read_text()) == {"step": 2, "model_only": True}
    assert not list(saved.glob("optimizer*")) and not list(saved.glob("random_states*"))
    assert AutoModelForCausalLM.from_pretrained(saved).config.model_type == "llama"

    both = run_cli(*args, "--save-only-model", "--resume")
    assert both.code == 2 and "--resume cannot continue a run saved with --save-only-model" in both.err
    resumed = run_cli(*args, "--resume")
    assert resumed.code == 2 and "checkpoint-2: written with --save-only-model" in resumed.err
    assert "Traceback" not in resumed.err


# ------------------------------------------------------------------ the step loop (training.fit) on a toy model

# y = 3x - 1 on ten points; the model is a zero-initialised linear map of (x, 1)
TOY_X = [[i / 10, 1.0] for i in range(10)]
TOY_Y = [3 * x - 1 for x, _ in TOY_X]


def _toy_fit(output: Path, stop_before_step: int = 0, **overrides):
    """fit() on the toy regression: 7 steps of 2 x 2 examples, rows every 3 steps, checkpoints every 2.
    ``stop_before_step`` (1-based) kills the run as that step starts. Returns (rows, evaluations, model)."""
    import torch

    from rlhfkit.config import TrainConfig
    from rlhfkit.training import fit, setup_training, start_run

    settings = dict(data="toy", output=str(output), max_steps=7, batch_size=2, grad_accum=2, lr=0.1,
                    lr_schedule="constant", logging_steps=3, save_steps=2, save_total_limit=0, seed=0, progress=False)
    cfg = TrainConfig(**{**settings, **overrides})
    x, y = torch.tensor(TOY_X), torch.tensor(TOY_Y)
    model = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    calls, evaluations = [], []
    with start_run(cfg) as run:
        training = setup_training(run, cfg, model, len(TOY_X))

        def loss_fn(indices):
            calls.append(indices)
            if stop_before_step and len(calls) > (stop_before_step - 1 - training.start) * cfg.grad_accum:
                raise KeyboardInterrupt
            err = training.model(x[indices]).squeeze(-1) - y[indices]
            return (err ** 2).sum(), {"tokens": len(indices), "abs_err": err.detach().abs().sum()}

        def evaluate():
            evaluations.append(len(calls))
            with torch.no_grad():
                return {"eval/mse": float(((training.model(x).squeeze(-1) - y) ** 2).mean())}

        rows = fit(run, cfg, training, loss_fn, desc="toy", per_example=("abs_err",), evaluate=evaluate)
    return rows, evaluations, training.model


def test_fit_logs_evaluates_and_checkpoints_on_schedule(tmp_path):
    """Rows every --logging-steps (3) and at the last step (7); one evaluation, at the end, in the
    last row; checkpoints every --save-steps (2) and at the end; the rows returned are the file's."""
    rows, evaluations, _ = _toy_fit(tmp_path / "o")
    assert [r["step"] for r in rows] == [3, 6, 7]
    assert evaluations == [7 * 2]  # once, after the 14 micro-batches of the 7 steps
    assert [sorted(k for k in r if k.startswith("eval/")) for r in rows] == [[], [], ["eval/mse"]]
    assert [p.name for p in list_checkpoints(tmp_path / "o")] == [f"checkpoint-{n}" for n in (2, 4, 6, 7)]
    assert read_metrics(tmp_path / "o") == rows
    assert rows[0]["epoch"] == pytest.approx(3 * 4 / 10)


def test_fit_row_of_the_first_step_hand_worked(tmp_path):
    """At w = 0 every prediction is 0: loss = mean y² over the step's 4 examples, abs_err = mean |y|,
    and the gradient of Σ(w·x − y)² / 4 is −(2/4) Σ y·x (its norm is logged before clipping)."""
    from rlhfkit.training import StepPlan

    rows, _, _ = _toy_fit(tmp_path / "o", max_steps=1, logging_steps=1)
    batch = StepPlan(10, 2, 2, 1, 0, 1).global_indices(0)
    ys, xs = [TOY_Y[i] for i in batch], [TOY_X[i] for i in batch]
    grad = [-0.5 * sum(y * x[j] for x, y in zip(xs, ys)) for j in range(2)]
    (row,) = rows
    assert row["step"] == 1 and row["epoch"] == pytest.approx(0.4)
    assert row["loss"] == pytest.approx(sum(y * y for y in ys) / 4, rel=1e-6)
    assert row["abs_err"] == pytest.approx(sum(abs(y) for y in ys) / 4, rel=1e-6)
    assert row["grad_norm"] == pytest.approx((grad[0] ** 2 + grad[1] ** 2) ** 0.5, rel=1e-6)
    assert row["learning_rate"] == 0.1


def test_fit_resumed_run_logs_the_rows_of_the_uninterrupted_run(tmp_path):
    import torch

    whole, _, whole_model = _toy_fit(tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        _toy_fit(tmp_path / "broken", stop_before_step=6)  # steps 1-5 done: rows of step 3, checkpoints 2 and 4
    assert [r["step"] for r in read_metrics(tmp_path / "broken")] == [3]
    resumed, evaluations, resumed_model = _toy_fit(tmp_path / "broken", resume=True)
    assert [r["step"] for r in resumed] == [6, 7] and evaluations == [3 * 2]  # steps 5-7 run again
    timing = {"tokens_per_second", "elapsed_s"}
    assert [{k: v for k, v in r.items() if k not in timing} for r in resumed] == \
        [{k: v for k, v in r.items() if k not in timing} for r in whole[1:]]
    assert torch.equal(whole_model.weight, resumed_model.weight)
    kept, *relogged = read_metrics(tmp_path / "broken")
    assert kept["step"] == 3 and relogged == resumed  # the rows after checkpoint-4 dropped, then logged once


# ------------------------------------------------------------------ what the recipes' train() returns


@pytest.mark.parametrize("recipe", ["sft", "rm", "dpo"])
def test_train_returns_the_final_metrics_and_the_paths(recipe, tiny_lm, sft_toy, pairs_train, pairs_eval, tmp_path):
    import importlib

    from rlhfkit.training import start_run

    module = importlib.import_module(f"rlhfkit.recipes.{recipe}")
    data, eval_data = (sft_toy, sft_toy) if recipe == "sft" else (pairs_train, pairs_eval)
    out = tmp_path / "o"
    cfg = module.Config(model=tiny_lm, data=data, eval_data=eval_data, output=str(out), max_steps=3, save_steps=2,
                        batch_size=4, progress=False)
    with start_run(cfg) as run:
        result = module.train(cfg, run)
    assert result.output == out and result.final_model == out and (out / "config.json").exists()
    assert result.checkpoints == [out / "checkpoint-2", out / "checkpoint-3"]  # --save-total-limit 2
    assert [r["step"] for r in result.history] == [1, 2, 3]
    assert result.history == read_metrics(out) and result.metrics == result.history[-1]
    assert "eval/loss" in result.metrics or "eval/accuracy" in result.metrics
    if recipe == "rm":
        from rlhfkit.models.reward import OFFSET_KEY

        assert result.reward_offset == json.loads((out / "config.json").read_text())[OFFSET_KEY]
