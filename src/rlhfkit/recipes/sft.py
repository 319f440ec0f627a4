"""Supervised fine-tuning (instruction tuning): next-token loss on completion tokens only.

    1. load and validate the data; tokenise with the chat template and the completion mask
    2. load the model (optionally LoRA); optimizer and schedule
    3. for each optimizer step: the step's examples -> padded micro-batches -> summed token
       losses / tokens in the global batch -> one AdamW step; log; checkpoint (training.fit)
    4. evaluate on --eval-data; save the final model
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhfkit.config import TrainConfig, arg, validated
from rlhfkit.data.chat import Encoded, encode
from rlhfkit.data.collate import collate
from rlhfkit.data.length import ExampleError, apply_length_policy
from rlhfkit.data.schema import load_sft
from rlhfkit.losses import sft_loss
from rlhfkit.training import Run, TrainResult, fit, save_final_model, setup_training, start_run


@dataclass
class Config(TrainConfig):
    """Supervised fine-tuning on completion / assistant tokens."""

    lr: float = arg(2e-5, "Peak learning rate (AdamW).")
    packing: bool = arg(False, "Pack several examples into each row of --max-length tokens (fewer pad "
                        "tokens; attention may cross example boundaries, position ids restart per example).")
    eval_batch_size: int = arg(16, "Examples per evaluation batch.")


# ---------------------------------------------------------------- data


def encode_examples(tokenizer, examples, cfg, run: Run | None = None, source: str = "") -> list[Encoded]:
    """Tokenise every example under the length policy (``cfg.max_length``, ``cfg.truncation``);
    refuse empty completion masks. ``source`` names the file in messages (default ``cfg.data``)."""

    def encode_one(ex) -> tuple[Encoded | None, bool]:
        enc = encode(tokenizer, ex.prompt, ex.completion, cfg.max_length, cfg.truncation)
        if enc is None:
            return None, True
        if not any(enc.trained):
            raise ExampleError("the completion mask is empty after tokenisation (nothing to train on)", "completion")
        return enc, enc.truncated

    return apply_length_policy(examples, encode_one, source=source or cfg.data, max_length=cfg.max_length,
                               truncation=cfg.truncation, say=run.print if run is not None else None)


def pack(encoded: list[Encoded], max_length: int) -> list[list[Encoded]]:
    """Greedy first-fit packing of whole examples into rows of at most ``max_length`` tokens."""
    rows: list[list[Encoded]] = []
    room: list[int] = []
    for enc in sorted(encoded, key=lambda e: -len(e.input_ids)):
        for i, r in enumerate(room):
            if len(enc.input_ids) <= r:
                rows[i].append(enc)
                room[i] -= len(enc.input_ids)
                break
        else:
            rows.append([enc])
            room.append(max_length - len(enc.input_ids))
    return rows


def trained_tokens(rows: list[list[Encoded]]) -> int:
    """Tokens that carry loss (the label of token t is predicted at t-1: the first never is)."""
    return sum(sum(e.trained[1:]) for row in rows for e in row)


# ---------------------------------------------------------------- loss


def batch_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"]).logits
    loss_sum, _ = sft_loss(logits, batch["labels"], reduction="sum")
    return loss_sum, {"tokens": batch["attention_mask"].sum()}


@torch.no_grad()
def evaluate(model, rows: list[list[Encoded]], pad_id: int, batch_size: int) -> dict[str, float]:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        loss_sum, _ = batch_loss(model, collate(chunk, pad_id))
        total += float(loss_sum)
        count += trained_tokens(chunk)
    model.train()
    loss = total / max(count, 1)
    return {"eval/loss": loss, "eval/perplexity": float(torch.exp(torch.tensor(min(loss, 50.0))))}


# ---------------------------------------------------------------- recipe


def build_model(cfg, device=None, task_type: str = "CAUSAL_LM"):
    """The model to train on ``device`` (the accelerator's) in --dtype, or quantized (QLoRA); see
    :func:`rlhfkit.models.loading.prepare_for_training`."""
    from rlhfkit.models.loading import load_causal_lm, prepare_for_training

    model = load_causal_lm(cfg.model, cfg.dtype, device, cfg.quantization_bits)
    return prepare_for_training(model, cfg, task_type)


def train(cfg: Config, run: Run) -> TrainResult:
    from rlhfkit.models.loading import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    pad_id = tokenizer.pad_token_id
    train_rows = encode_examples(tokenizer, load_sft(cfg.data, config=cfg.data_config, seed=cfg.seed), cfg, run)
    eval_rows = encode_examples(tokenizer, load_sft(cfg.eval_data, config=cfg.data_config, seed=cfg.seed), cfg) \
        if cfg.eval_data else []
    rows = pack(train_rows, cfg.max_length) if cfg.packing else [[e] for e in train_rows]
    eval_rows = [[e] for e in eval_rows]

    training = setup_training(run, cfg, build_model(cfg, run.accelerator.device), len(rows))
    model = training.model
    logged = fit(run, cfg, training, lambda mb: batch_loss(model, collate([rows[i] for i in mb], pad_id)),
                 desc="sft", normalizer=lambda batch: trained_tokens([rows[i] for i in batch]),
                 postfix={"tok_s": "tokens_per_second"},
                 evaluate=(lambda: evaluate(model, eval_rows, pad_id, cfg.eval_batch_size)) if eval_rows else None)
    return TrainResult.of(run, logged, save_final_model(run, model, tokenizer, cfg.merge_lora))


def main(cfg: Config) -> int:
    with start_run(validated(cfg)) as run:
        metrics = train(cfg, run).metrics
    if metrics:
        run.print(f"sft done: loss {metrics['loss']:.4f}" +
                  (f", eval loss {metrics['eval/loss']:.4f}" if "eval/loss" in metrics else "") +
                  f"; model saved to {run.output}")
    return 0
