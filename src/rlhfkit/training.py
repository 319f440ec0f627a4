"""The shared core of every training recipe: run setup, data order, the optimizer step, the
step loop (:func:`fit`), metrics, checkpoints and exact resume. Recipes call these; none copies them.

Scale-out is ``accelerate``'s: the same code runs in one process or under ``accelerate launch``
/ ``torchrun`` (DDP, FSDP, DeepSpeed). The data order is a pure function of (seed, step), so a
resumed run and a multi-process run see exactly the examples a single uninterrupted run sees.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlhfkit.config import save_config
from rlhfkit.errors import InputError

CHECKPOINT_PREFIX = "checkpoint-"


# --------------------------------------------------------------------------------------------
# Setup
# --------------------------------------------------------------------------------------------


def seed_everything(seed: int, process_index: int = 0) -> None:
    """Seed python, numpy and torch; each rank gets its own stream (lm-human-preferences style)."""
    s = seed + process_index * 100003
    random.seed(s)
    np.random.seed(s % (2**32))
    torch.manual_seed(s)


def make_accelerator(micro_batch_size: int = 1):
    from accelerate import Accelerator

    # step_scheduler_with_optimizer=False: by default accelerate steps a prepared scheduler
    # num_processes times per optimizer step (it assumes the step count was computed per
    # process); our StepPlan already counts optimizer steps of the global batch.
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), step_scheduler_with_optimizer=False)
    deepspeed = accelerator.state.deepspeed_plugin
    if deepspeed is not None and deepspeed.is_auto("train_micro_batch_size_per_gpu"):
        # DeepSpeed reads its micro-batch size from a prepared DataLoader; rlhfkit prepares none
        # (StepPlan picks the examples), so it is told --batch-size (only its bookkeeping uses it)
        deepspeed.deepspeed_config["train_micro_batch_size_per_gpu"] = micro_batch_size
    return accelerator


@dataclass
class Run:
    """What a recipe carries through training: accelerator, output folder and metrics sink."""

    accelerator: Any
    output: Path
    metrics: MetricsLogger
    started: float = field(default_factory=time.time)
    bf16: bool = False  # --bf16: every forward pass of the run under bfloat16 autocast (see autocast)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def autocast(self):
        """The context of the run's forward passes: with --bf16, ``torch.autocast`` to bfloat16, so
        matmuls (linear, attention) run in bfloat16 while the weights, their gradients and the
        optimizer state stay float32 and the log-softmax, losses and KL stay float32 (log-probs are
        read from upcast logits: :func:`rlhfkit.losses.token_logps`); without it, nothing.

        The core applies it where every recipe's forward runs: the loss of each micro-batch
        (:func:`optimizer_step`; the backward outside it, as torch advises), the evaluation of
        :func:`run_steps`, the reference pass (:func:`rlhfkit.models.reference.precompute_reference`)
        and the RL rollouts, so that the log-probs of a rollout and of its update are computed alike.
        accelerate's ``mixed_precision="bf16"`` applies this same autocast on the CPU, but to the
        prepared model only (not a frozen reference) and process-wide (``AcceleratorState`` is a
        singleton: one process cannot run an fp32 phase and a bf16 phase, as the demo and loop do).
        """
        if not self.bf16:
            return nullcontext()
        return torch.autocast(device_type=self.accelerator.device.type, dtype=torch.bfloat16)

    def print(self, *args) -> None:
        if self.is_main:
            print(*args, flush=True)

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc) -> None:
        self.metrics.close()


def start_run(cfg) -> Run:
    """Accelerator, seeds, output folder, resolved config saved as config.yaml. Use it as
    ``with start_run(cfg) as run:`` to close the metrics sinks at the end."""
    accelerator = make_accelerator(getattr(cfg, "batch_size", 1))
    seed_everything(cfg.seed, accelerator.process_index)
    output = Path(cfg.output)
    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        save_config(cfg, output)
    accelerator.wait_for_everyone()
    metrics = MetricsLogger(output, getattr(cfg, "report_to", "none"), enabled=accelerator.is_main_process,
                            append=getattr(cfg, "resume", False))
    return Run(accelerator, output, metrics, bf16=getattr(cfg, "bf16", False))


# --------------------------------------------------------------------------------------------
# Data order
# --------------------------------------------------------------------------------------------


@dataclass
class StepPlan:
    """Which examples every optimizer step uses.

    The training stream is the concatenation of per-epoch permutations seeded by (seed, epoch);
    step ``s`` takes the ``global_batch`` examples at positions ``s*G .. (s+1)*G``. Resuming at
    step ``s`` therefore needs nothing but ``s``.
    """

    num_examples: int
    batch_size: int
    grad_accum: int
    world_size: int
    seed: int
    total_steps: int

    @classmethod
    def from_config(cls, cfg, num_examples: int, world_size: int, grad_accum: int | None = None) -> StepPlan:
        """--batch-size, --grad-accum (unless ``grad_accum`` is given), --seed; --max-steps, else
        enough steps for --epochs passes."""
        grad_accum = cfg.grad_accum if grad_accum is None else grad_accum
        g = cfg.batch_size * grad_accum * world_size
        total = cfg.max_steps or max(1, math.ceil(cfg.epochs * num_examples / g))
        return cls(num_examples, cfg.batch_size, grad_accum, world_size, cfg.seed, total)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.world_size

    def _epoch_order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 7919 + epoch)
        return torch.randperm(self.num_examples, generator=g).tolist()

    def global_indices(self, step: int) -> list[int]:
        start, out = step * self.global_batch, []
        while len(out) < self.global_batch:
            pos = start + len(out)
            epoch, offset = divmod(pos, self.num_examples)
            order = self._epoch_order(epoch)
            out.extend(order[offset:offset + self.global_batch - len(out)])
        return out

    def local_microbatches(self, step: int, rank: int) -> list[list[int]]:
        """This rank's micro-batches of step ``step``: contiguous slices of the global batch."""
        idx = self.global_indices(step)
        per_rank = self.batch_size * self.grad_accum
        mine = idx[rank * per_rank:(rank + 1) * per_rank]
        return [mine[i:i + self.batch_size] for i in range(0, per_rank, self.batch_size)]

    def epoch_at(self, step: int) -> float:
        return step * self.global_batch / self.num_examples


# --------------------------------------------------------------------------------------------
# Optimisation
# --------------------------------------------------------------------------------------------


def make_optimizer(model, lr: float, weight_decay: float = 0.0, lr_by_prefix: dict[str, float] | None = None):
    """AdamW over the trainable parameters. ``lr_by_prefix`` gives the parameters whose name
    starts with a prefix their own learning rate (e.g. PPO's value head); the schedule scales
    every group alike."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters")
    groups: dict[float, list] = {lr: []}  # the base group first: get_last_lr()[0] is --lr's schedule
    for name, param in named:
        group_lr = next((v for k, v in (lr_by_prefix or {}).items() if name.startswith(k)), lr)
        groups.setdefault(group_lr, []).append(param)
    params = [p for _, p in named]
    # The fused kernel (one pass over param, grad and both moments) is several times faster than
    # the default per-tensor loop on CPU (measured in docs/training.md, "Optimizer").
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16, torch.float16)
                for p in params)
    return torch.optim.AdamW([{"params": ps, "lr": group_lr} for group_lr, ps in groups.items() if ps],
                             lr=lr, weight_decay=weight_decay, fused=fused)


def make_scheduler(optimizer, schedule: str, total_steps: int, warmup_ratio: float):
    from transformers import get_scheduler

    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=int(round(warmup_ratio * total_steps)),
                         num_training_steps=total_steps)


def optimizer_step(run: Run, model, optimizer, scheduler, microbatches: list, loss_fn: Callable,
                   normalizer: float, max_grad_norm: float) -> dict[str, float]:
    """One optimizer step over this rank's micro-batches.

    ``loss_fn(mb) -> (loss_sum, stats)`` returns the *sum* of per-example (or per-token) losses
    of the micro-batch. Dividing by ``normalizer`` -- the count over the whole global batch, all
    ranks and micro-batches -- makes the gradient identical whatever the split into processes and
    micro-batches (DDP averages over ranks, hence the factor ``num_processes``). ``loss_fn`` runs in
    ``run.autocast()`` (--bf16), the backward outside it.
    Returns the summed ``stats`` (reduced over ranks), ``loss`` and ``grad_norm``.
    """
    acc = run.accelerator
    totals: dict[str, torch.Tensor] = {}
    for i, mb in enumerate(microbatches):
        sync = acc.no_sync(model) if i < len(microbatches) - 1 and acc.num_processes > 1 else nullcontext()
        with sync:
            with run.autocast():
                loss_sum, stats = loss_fn(mb)
            acc.backward(loss_sum * acc.num_processes / normalizer)
        stats = {"loss": loss_sum.detach(), **stats}
        for k, v in stats.items():
            v = torch.as_tensor(v, dtype=torch.float64).detach().cpu()
            totals[k] = totals.get(k, 0) + v
    params = [p for p in model.parameters() if p.requires_grad]
    if max_grad_norm > 0:
        grad_norm = acc.clip_grad_norm_(params, max_grad_norm)
    else:
        grads = [p.grad.detach().norm() for p in params if p.grad is not None]
        grad_norm = torch.norm(torch.stack(grads)) if grads else torch.tensor(0.0)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    names = sorted(totals)
    stacked = torch.stack([totals[k] for k in names]).to(acc.device)
    if acc.num_processes > 1:
        stacked = acc.reduce(stacked, reduction="sum")
    out = {k: float(v) for k, v in zip(names, stacked.cpu())}
    out["loss"] = out["loss"] / normalizer
    out["grad_norm"] = float(grad_norm)
    return out


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def step_row(run: Run, plan: StepPlan, step: int, stats: dict[str, float], scheduler, elapsed: float) -> dict:
    """The keys every recipe logs for optimizer step ``step`` (0-based); ``stats`` from optimizer_step
    must hold ``loss``, ``grad_norm`` and ``tokens`` (tokens processed by all processes)."""
    return {"step": step + 1, "epoch": plan.epoch_at(step + 1), "loss": stats["loss"],
            "learning_rate": scheduler.get_last_lr()[0], "grad_norm": stats["grad_norm"],
            "tokens_per_second": stats["tokens"] / elapsed, "elapsed_s": time.time() - run.started}


class MetricsLogger:
    """``metrics.jsonl`` (one JSON object per logged step) plus optional TensorBoard / W&B."""

    def __init__(self, output: Path, report_to: str = "none", enabled: bool = True, append: bool = False):
        self.enabled = enabled
        self.path = Path(output) / "metrics.jsonl"
        self._tb = self._wandb = None
        if not enabled:
            return
        if not append and self.path.exists():
            self.path.unlink()
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(output) / "tensorboard"))
        elif report_to == "wandb":
            import wandb

            self._wandb = wandb.init(dir=str(output))

    def truncate_after(self, step: int) -> None:
        """On resume, drop rows logged after the checkpoint (they will be logged again)."""
        if not self.enabled or not self.path.exists():
            return
        rows = [json.loads(l) for l in self.path.read_text().splitlines() if l.strip()]
        kept = [r for r in rows if r.get("step", 0) <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def log(self, row: dict[str, Any]) -> dict[str, Any]:
        """Write ``row`` (on the main process); returns it as written (tensors and numpy numbers as floats)."""
        clean = {k: (float(v) if isinstance(v, (np.floating, torch.Tensor)) else v) for k, v in row.items()}
        if not self.enabled:
            return clean
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")
        step = clean.get("step", 0)
        if self._tb is not None:
            for k, v in clean.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(clean, step=step)
        return clean

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def progress(run: Run, total: int, initial: int = 0, desc: str = "train", enabled: bool = True):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not (enabled and run.is_main), dynamic_ncols=True)


# --------------------------------------------------------------------------------------------
# Checkpoints: atomic writes, exact resume
# --------------------------------------------------------------------------------------------


def list_checkpoints(output: str | Path) -> list[Path]:
    out = Path(output)
    if not out.exists():
        return []
    found = [p for p in out.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
             and p.name[len(CHECKPOINT_PREFIX):].isdigit() and (p / "trainer_state.json").exists()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def latest_checkpoint(output: str | Path) -> Path | None:
    found = list_checkpoints(output)
    return found[-1] if found else None


def save_checkpoint(run: Run, step: int, state: dict[str, Any], keep: int = 0) -> Path:
    """Save model, optimizer, scheduler, RNG states (accelerate) and ``state`` (JSON) atomically.

    Everything is written under a temporary name and renamed at the end, so a kill during the
    save never leaves a corrupt newest checkpoint (``trainer_state.json`` is written last).
    Objects registered with ``accelerator.register_for_checkpointing`` (e.g. a KL controller)
    are saved too.
    """
    acc = run.accelerator
    tmp = fresh_temporary(run, f"{CHECKPOINT_PREFIX}{step}")
    try:
        acc.save_state(str(tmp), safe_serialization=True)
        acc.wait_for_everyone()  # every rank has written its RNG state into tmp before it is renamed
        if run.is_main:
            (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **state}, indent=1))
    except (OSError, RuntimeError) as e:
        # a full disk surfaces as OSError (safetensors, json) or torch's "PytorchStreamWriter
        # failed writing file" RuntimeError; anything else is a bug and keeps its traceback
        if isinstance(e, RuntimeError) and "writ" not in str(e):
            raise
        if run.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise InputError(f"{run.output / tmp.name[len('.tmp-'):]}: cannot write the checkpoint "
                         f"({str(e).strip().splitlines()[0]}); the temporary folder was removed and the previous "
                         f"checkpoint is intact: free space in {run.output} and rerun with --resume") from None
    return commit_checkpoint(run, tmp, keep)


def save_model_checkpoint(run: Run, model, tokenizer, step: int, keep: int = 0) -> Path:
    """--save-only-model: checkpoint-N/ holds only the model, as :func:`save_final_model` writes it
    (loadable by transformers), and a ``trainer_state.json`` that marks it ``model_only``: no
    optimizer, scheduler or RNG state, so no run can resume from it. Atomic and rotated like
    :func:`save_checkpoint`."""
    tmp = fresh_temporary(run, f"{CHECKPOINT_PREFIX}{step}")
    save_final_model(run, model, tokenizer, subdir=tmp.name)
    if run.is_main:
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "model_only": True}, indent=1))
    return commit_checkpoint(run, tmp, keep)


def fresh_temporary(run: Run, name: str) -> Path:
    """``.tmp-<name>`` in the output, emptied of what a killed save left there."""
    tmp = run.output / f".tmp-{name}"
    if run.is_main and tmp.exists():
        shutil.rmtree(tmp)
    run.accelerator.wait_for_everyone()
    return tmp


def commit_checkpoint(run: Run, tmp: Path, keep: int) -> Path:
    """Rename the complete temporary folder to its final name (replacing an older copy), then keep
    only the newest ``keep`` checkpoints (0: all)."""
    final = run.output / tmp.name[len(".tmp-"):]
    if run.is_main:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep > 0:
            for old in list_checkpoints(run.output)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    run.accelerator.wait_for_everyone()
    return final


def load_checkpoint(run: Run, path: Path) -> dict[str, Any]:
    """Restore everything :func:`save_checkpoint` wrote; returns the JSON state (with ``step``)."""
    run.accelerator.load_state(str(path))
    return json.loads((path / "trainer_state.json").read_text())


def resume_if_requested(run: Run, cfg) -> dict[str, Any]:
    """With ``--resume``: restore the newest checkpoint (if any); returns its state or {"step": 0}."""
    if not getattr(cfg, "resume", False):
        return {"step": 0}
    ckpt = latest_checkpoint(run.output)
    if ckpt is not None and json.loads((ckpt / "trainer_state.json").read_text()).get("model_only"):
        raise InputError(f"{ckpt}: written with --save-only-model (the model without optimizer, scheduler or RNG "
                         f"state): --resume cannot continue from it; train again without --resume, or start a new "
                         f"run from it with --model {ckpt}")
    if ckpt is None:
        run.print(f"--resume: no checkpoint in {run.output}; starting from scratch")
        run.metrics.truncate_after(0)  # rows of the run that died before its first checkpoint
        return {"step": 0}
    state = load_checkpoint(run, ckpt)
    run.metrics.truncate_after(state["step"])
    run.print(f"resumed from {ckpt} (step {state['step']})")
    return state


def save_final_model(run: Run, model, tokenizer, merge_lora: bool = False, subdir: str = "") -> Path:
    """Save the trained model so that ``transformers`` loads it directly (or a peft adapter)."""
    target = run.output / subdir if subdir else run.output
    run.accelerator.wait_for_everyone()
    if run.is_main:
        unwrapped = run.accelerator.unwrap_model(model)
        if merge_lora and hasattr(unwrapped, "merge_and_unload"):
            unwrapped = unwrapped.merge_and_unload()
        unwrapped.save_pretrained(target, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(target)
    run.accelerator.wait_for_everyone()
    return target


# --------------------------------------------------------------------------------------------
# The loop: setup, the step loop, the result
# --------------------------------------------------------------------------------------------


@dataclass
class Training:
    """What :func:`setup_training` prepared: model, optimizer and schedule (wrapped by accelerate),
    the data order, and the first step to run (the resumed checkpoint's, else 0)."""

    model: Any
    optimizer: Any
    scheduler: Any
    plan: StepPlan
    start: int = 0


def setup_training(run: Run, cfg, model, num_examples: int, *, grad_accum: int | None = None,
                   updates_per_step: int = 1, lr_by_prefix: dict[str, float] | None = None,
                   checkpointed: tuple = ()) -> Training:
    """The setup every recipe shares: the StepPlan over ``num_examples``, AdamW (``lr_by_prefix``:
    see :func:`make_optimizer`), the schedule over ``total_steps × updates_per_step`` optimizer
    steps (PPO makes several per iteration), ``accelerator.prepare``, and --resume.
    ``checkpointed``: objects saved and restored with every checkpoint (e.g. PPO's KL controller)."""
    acc = run.accelerator
    plan = StepPlan.from_config(cfg, num_examples, acc.num_processes, grad_accum)
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, lr_by_prefix)
    scheduler = make_scheduler(optimizer, cfg.lr_schedule, plan.total_steps * updates_per_step, cfg.warmup_ratio)
    model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
    for obj in checkpointed:
        acc.register_for_checkpointing(obj)
    start = resume_if_requested(run, cfg)["step"]
    return Training(model, optimizer, scheduler, plan, start)


@dataclass
class TrainResult:
    """What a recipe's ``train(cfg, run)`` returns: its final metrics and where it wrote what.
    Recipes that write more (policy snapshots, rounds) extend it."""

    output: Path             # --output: config.yaml, metrics.jsonl
    final_model: Path        # loadable by transformers (with LoRA, unmerged: an adapter folder)
    metrics: dict[str, Any]  # the last row logged (the final evaluation included); {} if no step ran
    # every row this call logged, as in metrics.jsonl (after --resume: from the resumed step on)
    history: list[dict[str, Any]] = field(default_factory=list)
    checkpoints: list[Path] = field(default_factory=list)  # checkpoint-N/ folders kept in output

    @classmethod
    def of(cls, run: Run, rows: list[dict[str, Any]], final_model: Path, **extra):
        """The record of a finished run from the rows it logged (``extra``: a subclass's fields)."""
        return cls(output=run.output, final_model=final_model, metrics=rows[-1] if rows else {}, history=rows,
                   checkpoints=list_checkpoints(run.output), **extra)


def run_steps(run: Run, cfg, training: Training, step_fn: Callable[[int], dict[str, Any]], *, desc: str,
              postfix: dict[str, str], evaluate: Callable[[], dict[str, float]] | None = None,
              save: Callable[[int], Any] | None = None) -> list[dict[str, Any]]:
    """The schedule every recipe's loop shares, around ``step_fn(step) -> metrics row`` (0-based).

    From ``training.start`` to the plan's last step: a row is logged every --logging-steps steps
    and at the last step, which also holds the final evaluation (``evaluate()``, when given);
    ``save(n)`` (default: checkpoint-n/) runs every --save-steps steps and once after the last
    step (not with --save-only-model: the final model is that step's model); the progress bar
    shows the row keys ``postfix`` names. Returns the rows logged.
    """
    total = training.plan.total_steps
    if save is None and cfg.save_only_model:
        save = partial(save_model_checkpoint, run, training.model, None, keep=cfg.save_total_limit)
    save = save or (lambda done: save_checkpoint(run, done, {}, cfg.save_total_limit))
    bar = progress(run, total, training.start, desc, cfg.progress)
    logged: list[dict[str, Any]] = []
    for step in range(training.start, total):
        row, done = step_fn(step), step + 1
        if done == total and evaluate is not None:
            with run.autocast():
                row.update(evaluate())
        if done % cfg.logging_steps == 0 or done == total:
            logged.append(run.metrics.log(row))
        if cfg.save_steps and done % cfg.save_steps == 0 and done < total:
            save(done)
        bar.set_postfix({label: f"{row[key]:.3f}" if abs(row[key]) < 100 else f"{row[key]:.0f}"
                         for label, key in postfix.items()})
        bar.update(1)
    bar.close()
    if not cfg.save_only_model:  # the final model is what a model-only checkpoint of the last step would hold
        save(total)
    return logged


@torch.no_grad()
def evaluate_means(model, num_examples: int, batch_size: int, loss_fn: Callable[[list[int]], tuple],
                   prefix: str = "eval/") -> dict[str, float]:
    """Held-out means of a recipe's ``loss_fn(indices) -> (loss_sum, stats)`` (sums over the
    examples, as :func:`fit` takes it) over examples 0..num_examples-1, ``batch_size`` at a time,
    the model in eval mode: ``{prefix + "loss": ..., prefix + stat: ...}`` (``tokens`` left out)."""
    model.eval()
    totals: dict[str, float] = {}
    for start in range(0, num_examples, batch_size):
        loss, stats = loss_fn(list(range(start, min(start + batch_size, num_examples))))
        for k, v in {"loss": loss, **stats}.items():
            if k != "tokens":
                totals[k] = totals.get(k, 0.0) + float(v)
    model.train()
    return {f"{prefix}{k}": v / num_examples for k, v in totals.items()}


def fit(run: Run, cfg, training: Training, loss_fn: Callable, *, desc: str,
        normalizer: Callable[[list[int]], float] | None = None, per_example: tuple[str, ...] = (),
        postfix: dict[str, str] | None = None, evaluate: Callable[[], dict[str, float]] | None = None,
        constants: dict[str, float] | None = None,
        derived: Callable[[dict[str, float]], dict[str, float]] | None = None) -> list[dict[str, Any]]:
    """The step loop of step-based recipes (sft, rm, dpo): each step is one :func:`optimizer_step`
    over this rank's micro-batches of the StepPlan, scheduled by :func:`run_steps`.

    ``loss_fn(indices) -> (loss_sum, stats)`` sums over the examples ``indices`` (one micro-batch);
    ``normalizer(global_indices)`` is the count that sum is divided by (default: the examples of
    the global batch; SFT: its trained tokens). A row is :func:`step_row` plus the summed ``stats``
    named in ``per_example``, as means over the global batch, plus ``constants`` (statistics of the
    whole run, e.g. offline RL's fraction of examples kept), plus ``derived(stats)``: metrics
    computed from the step's summed ``stats`` (e.g. KTO's means over its desirable examples only).
    Returns the rows logged.
    """
    acc, plan = run.accelerator, training.plan

    def step_fn(step: int) -> dict[str, Any]:
        t0 = time.time()
        batch = plan.global_indices(step)
        stats = optimizer_step(run, training.model, training.optimizer, training.scheduler,
                               plan.local_microbatches(step, acc.process_index), loss_fn,
                               normalizer=normalizer(batch) if normalizer else len(batch),
                               max_grad_norm=cfg.max_grad_norm)
        row = step_row(run, plan, step, stats, training.scheduler, time.time() - t0)
        return {**row, **{k: stats[k] / plan.global_batch for k in per_example}, **(derived(stats) if derived else {}),
                **(constants or {})}

    return run_steps(run, cfg, training, step_fn, desc=desc, evaluate=evaluate,
                     postfix={"loss": "loss", **(postfix or {})})
