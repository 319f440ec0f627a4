"""Kahneman–Tversky optimisation (KTO, Ethayarajh et al. 2024) on unpaired feedback.

    1. read the records {prompt, completion, label} (a preference pair gives both of its sides:
       chosen desirable, rejected undesirable); tokenise each as one prompt and one completion
    2. the reference π_ref: --ref-model, else the initial policy (with LoRA: the base model,
       adapters disabled), run every step without gradients (dpo.live_reference). It is not
       cached: the mismatched pairs of step 3 depend on which examples share a micro-batch.
    3. for each optimizer step, each micro-batch of the step's examples (training.fit):
       a. the mismatched (KL) pairs, as TRL builds them: prompt k with the completion of
          example k−1 of the micro-batch (the first with the last's) -- :func:`kl_groups`
       b. one padding-free forward of the policy, and one of the reference, over every prompt
          with its own completion and its mismatched one (each prompt encoded once; see
          rlhfkit.models.packed)
       c. the reference point z_ref = max(0, mean log-ratio of the mismatched pairs), detached,
          averaged over the processes (losses.kto_reference_point)
       d. losses.UNPAIRED_LOSSES[--loss] → per-example losses weighted by --desirable-weight /
          --undesirable-weight; AdamW step; log rewards/*, logps/*, kl as TRL 1.16 does
    4. evaluate on --eval-data; save the final model

The metrics are TRL 1.16 KTOTrainer's: ``rewards/chosen`` and ``logps/chosen`` are means over
the step's desirable examples, ``*/rejected`` over its undesirable ones (absent from a row
whose step had none), ``rewards/margins`` their difference, ``kl`` the z_ref of the step's
micro-batches (their mean).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from rlhfkit.config import TrainConfig, arg, validated
from rlhfkit.data.chat import encode
from rlhfkit.data.length import apply_length_policy
from rlhfkit.data.schema import UnpairedExample, load_unpaired
from rlhfkit.losses import UNPAIRED_LOSSES, kto_reference_point
from rlhfkit.models.packed import Group, completion_logps, supports_packing
from rlhfkit.recipes.dpo import Reference, disable_dropout, live_reference
from rlhfkit.recipes.sft import build_model
from rlhfkit.training import Run, TrainResult, evaluate_means, fit, save_final_model, setup_training, start_run

LossName = Literal["kto", "apo_zero_unpaired"]
SIDES = (("chosen", True), ("rejected", False))   # TRL's metric name of each label


@dataclass
class Config(TrainConfig):
    """KTO on unpaired feedback: completions labelled desirable or undesirable."""

    lr: float = arg(1e-6, "Peak learning rate (AdamW); KTO, like DPO, wants small ones for full fine-tuning.")
    loss: LossName = arg("kto", "Loss (rlhfkit.losses.UNPAIRED_LOSSES): kto (with the reference point estimated "
                         "from mismatched pairs), apo_zero_unpaired (none).")
    beta: float = arg(0.1, "β: the strength of the KL regularisation toward the reference.")
    desirable_weight: float = arg(1.0, "λ_D, the weight of the desirable examples' losses.")
    undesirable_weight: float = arg(1.0, "λ_U, the weight of the undesirable examples' losses; with unbalanced "
                                    "data keep λ_D·n_D / (λ_U·n_U) in [1, 4/3] (the KTO paper's advice).")
    ref_model: str = arg("", "Reference model (path, hub id, embedded name); default: the initial policy "
                         "(with LoRA: the base model with the adapters disabled).")
    packed: bool = arg(True, "Padding-free forward with each prompt encoded once for its own and its mismatched "
                       "completion (Llama-family models; others fall back to padded rows automatically).")
    eval_batch_size: int = arg(16, "Examples per evaluation forward (each batch estimates its own z_ref).")

    def validate(self) -> list[str]:
        problems = super().validate()
        if self.beta <= 0:
            problems.append(f"--beta must be > 0 (got {self.beta})")
        for name in ("desirable_weight", "undesirable_weight"):
            if getattr(self, name) <= 0:
                problems.append(f"--{name.replace('_', '-')} must be > 0 (got {getattr(self, name)})")
        if self.eval_batch_size < 1:
            problems.append("--eval-batch-size must be >= 1")
        if UNPAIRED_LOSSES[self.loss].reference_point and (self.batch_size < 2 or self.eval_batch_size < 2):
            problems.append(f"--loss {self.loss} estimates its reference point from the other examples of a "
                            f"micro-batch: --batch-size and --eval-batch-size must be >= 2")
        return problems


# ---------------------------------------------------------------- data


@dataclass
class EncodedExample:
    """One example as token ids: its prompt, its completion (``scored``: the tokens that count) and its label."""

    prompt: list[int]
    completion: list[int]
    scored: list[bool]
    desirable: bool


def encode_examples(tokenizer, examples: list[UnpairedExample], path: str, max_length: int,
                    truncation: str = "truncate", say=None) -> list[EncodedExample]:
    """Every example of ``path`` tokenised under the length policy (:mod:`rlhfkit.data.length`);
    problems name the file and record; ``say`` receives the truncation report."""

    def encode_one(ex: UnpairedExample) -> tuple[EncodedExample | None, bool]:
        enc = encode(tokenizer, ex.prompt, ex.completion, max_length, truncation)
        if enc is None:
            return None, True
        p = enc.prompt_length
        if p == len(enc.input_ids):
            raise ValueError("the completion has no trained token" +
                             (f" after truncation to --max-length {max_length}" if enc.truncated else ""))
        if p == 0:
            raise ValueError("the prompt has no token")
        return EncodedExample(enc.input_ids[:p], enc.input_ids[p:], enc.trained[p:], ex.desirable), enc.truncated

    return apply_length_policy(examples, encode_one, source=path, max_length=max_length, truncation=truncation,
                               say=say)


def kl_groups(examples: list[EncodedExample], max_length: int, mismatched: bool) -> list[Group]:
    """One group per example: its prompt with its own completion and, with ``mismatched``, the
    completion of the example before it (the first takes the last's), cut to --max-length.

    TRL's KL pairs: (x_1, y_n), (x_2, y_1), ..., (x_n, y_{n−1}), so the mismatched completions of
    a batch are the batch's own completions, each paired with another prompt.
    """
    groups = []
    for k, ex in enumerate(examples):
        completions, scored = [ex.completion], [ex.scored]
        if mismatched:
            other = examples[k - 1]
            room = max(max_length - len(ex.prompt), 1)
            completions.append(other.completion[:room])
            scored.append(other.scored[:room])
        groups.append(Group(ex.prompt, completions, scored))
    return groups


# ---------------------------------------------------------------- loss


def example_losses(cfg, policy: torch.Tensor, ref: torch.Tensor, desirable: torch.Tensor, gather=None):
    """Per-example losses, rewards and z_ref from log-probs laid out [own, mismatched] per example
    (``policy``, ``ref``: ``[B, 2]``; ``[B, 1]`` for a loss without a reference point)."""
    entry = UNPAIRED_LOSSES[cfg.loss]
    z = kto_reference_point(policy[:, 1] - ref[:, 1], gather) if entry.reference_point else policy.new_zeros(())
    losses, rewards = entry.fn(policy[:, 0], ref[:, 0], desirable, z, beta=cfg.beta,
                               desirable_weight=cfg.desirable_weight, undesirable_weight=cfg.undesirable_weight)
    return losses, rewards, z


def example_stats(policy_logps: torch.Tensor, rewards: torch.Tensor, desirable: torch.Tensor, z) -> dict:
    """Sums over the examples of each label, their counts, and z_ref times the example count
    (optimizer_step sums micro-batches and processes; :func:`kto_means` turns the sums into means)."""
    stats = {"kl": z.detach() * len(rewards)}
    for name, label in SIDES:
        side = desirable == label
        stats[f"rewards/{name}"] = rewards[side].sum()
        stats[f"logps/{name}"] = policy_logps.detach()[side].sum()
        stats[f"count/{name}"] = side.sum()
    return stats


def kto_means(sums: dict[str, float]) -> dict[str, float]:
    """TRL 1.16's metrics from the summed statistics: means over the examples of each label (a
    label with no example has none), their margin, and z_ref averaged over the examples."""
    total = sums["count/chosen"] + sums["count/rejected"]
    out = {"kl": sums["kl"] / total}
    for name, _ in SIDES:
        if sums[f"count/{name}"] > 0:
            out[f"rewards/{name}"] = sums[f"rewards/{name}"] / sums[f"count/{name}"]
            out[f"logps/{name}"] = sums[f"logps/{name}"] / sums[f"count/{name}"]
    if "rewards/chosen" in out and "rewards/rejected" in out:
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    return out


def batch_loss(model, examples: list[EncodedExample], indices: list[int], reference: Reference, cfg, packed: bool,
               pad_id: int, gather=None):
    """Sum of the per-example losses of ``indices`` (one micro-batch) and the summed statistics."""
    batch = [examples[i] for i in indices]
    mismatched = UNPAIRED_LOSSES[cfg.loss].reference_point
    groups = kl_groups(batch, cfg.max_length, mismatched)
    width = 2 if mismatched else 1
    scored = completion_logps(model, groups, packed, pad_id)
    policy = scored.logps.view(-1, width)
    ref = reference.score(groups, model, packed, pad_id).logps.view(-1, width).to(policy.device, policy.dtype)
    desirable = torch.tensor([ex.desirable for ex in batch], device=policy.device)
    losses, rewards, z = example_losses(cfg, policy, ref, desirable, gather)
    return losses.sum(), {**example_stats(policy[:, 0], rewards, desirable, z), "tokens": scored.tokens}


# ---------------------------------------------------------------- recipe


def evaluate(model, examples: list[EncodedExample], reference: Reference, cfg, packed: bool, pad_id: int) -> dict:
    """Held-out loss and metrics; every batch of --eval-batch-size estimates its own z_ref."""

    def loss_fn(indices: list[int]):
        return batch_loss(model, examples, indices, reference, cfg, packed, pad_id)

    means = evaluate_means(model, len(examples), cfg.eval_batch_size, loss_fn, prefix="")
    return {"eval/loss": means["loss"], **{f"eval/{k}": v for k, v in kto_means(means).items()}}


def load_split(tokenizer, cfg, path: str, say) -> list[EncodedExample]:
    examples = load_unpaired(path, config=cfg.data_config, seed=cfg.seed)
    return encode_examples(tokenizer, examples, path, cfg.max_length, cfg.truncation, say)


def train(cfg: Config, run: Run) -> TrainResult:
    from rlhfkit.models.loading import load_tokenizer

    acc = run.accelerator
    tokenizer = load_tokenizer(cfg.model)
    pad_id = tokenizer.pad_token_id
    train_examples = load_split(tokenizer, cfg, cfg.data, run.print)
    eval_examples = load_split(tokenizer, cfg, cfg.eval_data, run.print) if cfg.eval_data else []
    desirable = sum(ex.desirable for ex in train_examples)
    run.print(f"{cfg.data}: {desirable} desirable and {len(train_examples) - desirable} undesirable examples")

    model = build_model(cfg, acc.device)
    disable_dropout(model)
    packed = cfg.packed and supports_packing(model)
    if cfg.packed and not packed:
        run.print(f"note: {type(model).__name__} has no packed path; using padded rows")
    reference = live_reference(run, cfg, model)

    training = setup_training(run, cfg, model, len(train_examples))
    model = training.model
    gather = acc.gather if acc.num_processes > 1 else None

    def loss_fn(indices: list[int]):
        return batch_loss(model, train_examples, indices, reference, cfg, packed, pad_id, gather)

    def final_eval() -> dict[str, float]:
        return evaluate(model, eval_examples, reference, cfg, packed, pad_id)

    logged = fit(run, cfg, training, loss_fn, desc=f"kto ({cfg.loss})", derived=kto_means, postfix={"kl": "kl"},
                 evaluate=final_eval if eval_examples else None)
    return TrainResult.of(run, logged, save_final_model(run, model, tokenizer, cfg.merge_lora))


def main(cfg: Config) -> int:
    """Train; also callable from Python: ``main(Config(model=..., data=..., output=...))``."""
    with start_run(validated(cfg)) as run:
        metrics = train(cfg, run).metrics
    if metrics:
        margin = f", margin {metrics['rewards/margins']:.3f}" if "rewards/margins" in metrics else ""
        run.print(f"kto ({cfg.loss}) done: loss {metrics['loss']:.4f}, kl {metrics['kl']:.4f}{margin}" +
                  (f"; eval loss {metrics['eval/loss']:.4f}" if "eval/loss" in metrics else "") +
                  f"; model saved to {run.output}")
    return 0
