"""Process reward model training: a verdict on every step of a chain (PRM800K / Math-Shepherd style).

    1. load stepwise records ``{prompt, completions: [step, ...], labels: [bool, ...]}``; tokenise
       each chain piece by piece (prompt, separator, step, separator, ...) so that the position of
       every separator is exact (:func:`rlhfkit.models.prm.encode_steps`); the length policy
    2. a two-label token-classification head on the backbone (a causal LM or an encoder)
    3. for each optimizer step: the step's chains in one forward, cross-entropy at the separator
       positions only (:func:`rlhfkit.losses.process_reward_loss`), summed and divided by the
       labelled steps of the global batch; log; checkpoint (training.fit)
    4. evaluate step accuracy and first-error accuracy on --eval-data; save a folder that
       ``AutoModelForTokenClassification`` loads directly, the separator stored in its config

``--train-on-last-step-only`` keeps only each chain's last label (its outcome): an outcome reward
model trained on the same chains, the baseline PRMs are compared with (bench/prm_best_of_n.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhfkit.config import TrainConfig, arg, validated
from rlhfkit.data import length
from rlhfkit.data.schema import StepwiseExample, load_stepwise
from rlhfkit.evaluation.step_accuracy import step_metrics
from rlhfkit.losses import process_reward_loss
from rlhfkit.models.prm import (
    DEFAULT_SEPARATOR,
    SEPARATOR_KEY,
    StepEncoding,
    encode_steps,
    step_batch,
    step_log_probs,
    step_logits,
)
from rlhfkit.training import Run, TrainResult, fit, save_final_model, setup_training, start_run

ESCAPES = {"\\n": "\n", "\\t": "\t", "\\r": "\r"}


@dataclass
class Config(TrainConfig):
    """Train a process reward model on step-labelled chains (TRL stepwise supervision)."""

    model: str = arg("smollm2-135m", "Backbone: a causal LM or an encoder (path, hub id, or an embedded name "
                     "such as smollm2-135m or minilm-l6).")
    lr: float = arg(5e-5, "Peak learning rate (AdamW).")
    step_separator: str = arg(DEFAULT_SEPARATOR, "Written after the prompt and after every step; the verdict on "
                              "a step is read at its last token. \\n, \\t and \\r are understood as escapes.")
    train_on_last_step_only: bool = arg(False, "Train on each chain's last label only (its outcome): an outcome "
                                        "reward model on the same chains. Evaluation still reads every step.")
    eval_batch_size: int = arg(32, "Chains per evaluation forward.")

    @property
    def separator(self) -> str:
        text = self.step_separator
        for escape, char in ESCAPES.items():
            text = text.replace(escape, char)
        return text

    def validate(self) -> list[str]:
        problems = super().validate()
        if not self.separator:
            problems.append("--step-separator must not be empty")
        if self.eval_batch_size < 1:
            problems.append(f"--eval-batch-size must be >= 1 (got {self.eval_batch_size})")
        return problems


@dataclass(frozen=True)
class Chain:
    """One tokenised chain and the labels of the steps it kept (all of them unless truncated)."""

    encoding: StepEncoding
    labels: list[bool]


def encode_chains(tokenizer, examples: list[StepwiseExample], cfg: Config, source: str,
                  run: Run | None = None) -> list[Chain]:
    """Every chain tokenised under the length policy (:mod:`rlhfkit.data.length`): a chain longer
    than --max-length is dropped, or kept with the start of its prompt and then its last steps cut
    (a chain of which no step fits is an error of that record)."""

    def encode(ex: StepwiseExample) -> tuple[Chain, bool]:
        enc = encode_steps(tokenizer, ex.prompt, ex.steps, cfg.separator, cfg.max_length)
        if not enc.step_ends and cfg.truncation == "truncate":
            raise length.ExampleError(f"not even the first step fits in --max-length {cfg.max_length}",
                                      "completions")
        return Chain(enc, ex.labels[:len(enc.step_ends)]), enc.truncated

    return length.apply_length_policy(examples, encode, source=source, max_length=cfg.max_length,
                                      truncation=cfg.truncation, say=run.print if run is not None else None)


def trained_labels(chain: Chain, last_step_only: bool) -> list[bool | None]:
    """The labels that carry loss (None: no loss at that step)."""
    if not last_step_only:
        return list(chain.labels)
    return [None] * (len(chain.labels) - 1) + [chain.labels[-1]]


@torch.no_grad()
def evaluate(model, chains: list[Chain], pad_id: int, batch_size: int) -> dict[str, float]:
    """``eval/loss`` (mean cross-entropy per step) and :func:`step_metrics` on every step."""
    model.eval()
    logps = step_log_probs(model, [c.encoding for c in chains], pad_id, batch_size)
    model.train()
    labels = [c.labels for c in chains]
    nll = [-float(lp[s, int(ok)]) for lp, ls in zip(logps, labels) for s, ok in enumerate(ls)]
    metrics = step_metrics([lp[:, 1].exp().tolist() for lp in logps], labels)
    return {"eval/loss": sum(nll) / len(nll), **{f"eval/{k}": v for k, v in metrics.items()}}


def build_model(cfg: Config, tokenizer, device=None):
    """The two-label token head to train on ``device`` (the accelerator's) in --dtype, or quantized
    (QLoRA); see :func:`rlhfkit.models.loading.prepare_for_training`."""
    from rlhfkit.models.loading import prepare_for_training
    from rlhfkit.models.prm import load_prm_backbone

    model = load_prm_backbone(cfg.model, tokenizer, cfg.dtype, device, cfg.quantization_bits)
    return prepare_for_training(model, cfg, "TOKEN_CLS")


def train(cfg: Config, run: Run) -> TrainResult:
    from rlhfkit.models.loading import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    pad_id = tokenizer.pad_token_id
    data = encode_chains(tokenizer, load_stepwise(cfg.data, config=cfg.data_config, seed=cfg.seed), cfg, cfg.data,
                         run)
    eval_data = encode_chains(tokenizer, load_stepwise(cfg.eval_data, config=cfg.data_config, seed=cfg.seed), cfg,
                              cfg.eval_data) if cfg.eval_data else []
    targets = [trained_labels(c, cfg.train_on_last_step_only) for c in data]

    training = setup_training(run, cfg, build_model(cfg, tokenizer, run.accelerator.device), len(data))
    model = training.model

    def loss_fn(indices: list[int]):
        batch = step_batch([data[i].encoding for i in indices], pad_id, [targets[i] for i in indices])
        logits = step_logits(model, batch)
        labels = batch["labels"].to(logits.device)
        with torch.no_grad():  # per chain: the fraction of its trained steps judged right
            hits = ((logits.argmax(-1) == labels) & (labels >= 0)).sum(-1)
            accuracy = (hits / (labels >= 0).sum(-1).clamp(min=1)).sum()
        return process_reward_loss(logits, labels).sum(), {"train/step_accuracy": accuracy,
                                                           "tokens": batch["attention_mask"].sum()}

    def labelled_steps(indices: list[int]) -> int:
        return sum(x is not None for i in indices for x in targets[i])

    logged = fit(run, cfg, training, loss_fn, desc="prm", normalizer=labelled_steps,
                 per_example=("train/step_accuracy",), postfix={"acc": "train/step_accuracy"},
                 evaluate=(lambda: evaluate(model, eval_data, pad_id, cfg.eval_batch_size)) if eval_data else None)
    return TrainResult.of(run, logged, save_prm(run, cfg, model, tokenizer))


def save_prm(run: Run, cfg: Config, model, tokenizer):
    """Save a folder transformers loads directly (LoRA always merged), the separator in its config."""
    final = run.accelerator.unwrap_model(model)
    if cfg.lora_r:
        final = final.merge_and_unload()
    setattr(final.config, SEPARATOR_KEY, cfg.separator)
    return save_final_model(run, final, tokenizer)


def main(cfg: Config) -> int:
    with start_run(validated(cfg)) as run:
        metrics = train(cfg, run).metrics
    if "eval/step_accuracy" in metrics:
        run.print(f"prm done: eval step accuracy {metrics['eval/step_accuracy']:.3f} (always 'correct': "
                  f"{metrics['eval/always_correct_accuracy']:.3f}), first-error accuracy "
                  f"{metrics['eval/first_error_accuracy']:.3f}; model saved to {run.output}")
    else:
        run.print(f"prm done: loss {metrics.get('loss', float('nan')):.4f}; model saved to {run.output}")
    return 0
