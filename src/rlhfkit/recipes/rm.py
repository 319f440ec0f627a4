"""Reward-model training with the Bradley–Terry loss (and listwise losses for rankings).

    1. load comparisons: pairs (prompt, chosen, rejected, margin?) and rankings (K completions)
    2. a scalar head on the backbone (causal LM: last non-padding token; encoder: pooled output)
    3. for each optimizer step: score every completion of the step's comparisons in one forward,
       loss per comparison (BT with the optional Llama 2 margin; best-of-K softmax or
       Plackett–Luce for rankings), mean over the global batch; log; checkpoint (training.fit)
    4. evaluate agreement on --eval-data; optionally shift scores so the mean training reward is
       0 (stored in the model's config); save a folder that transformers loads directly
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from rlhfkit.config import TrainConfig, arg, validated
from rlhfkit.data import length
from rlhfkit.data.io import read_records
from rlhfkit.data.schema import parse_preference, parse_ranking
from rlhfkit.errors import InputError
from rlhfkit.evaluation.rm_accuracy import agreement
from rlhfkit.losses import bradley_terry_loss, listwise_loss, plackett_luce_loss
from rlhfkit.models.reward import OFFSET_KEY, forward_rewards, reward_inputs
from rlhfkit.training import Run, TrainResult, fit, save_final_model, setup_training, start_run

RankingLoss = Literal["pairs", "listwise", "plackett-luce"]


@dataclass
class Config(TrainConfig):
    """Train a reward model on preference pairs or rankings (Bradley–Terry)."""

    model: str = arg("minilm-l6", "Backbone: a causal LM or an encoder (path, hub id, or an embedded name "
                     "such as minilm-l6 or smollm2-135m).")
    lr: float = arg(2e-5, "Peak learning rate (AdamW).")
    use_margin: bool = arg(True, "Use the records' `margin` field as the Llama 2 margin term: "
                           "-log sigmoid(r_chosen - r_rejected - margin).")
    ranking_loss: RankingLoss = arg("pairs", "Rankings: `pairs` expands each into all pairs (BT); `listwise` is "
                                    "the best-of-K softmax of Ziegler et al.; `plackett-luce` uses the whole ranking.")
    normalize: bool = arg(True, "Store an offset so that the mean reward over the training completions is 0.")
    eval_batch_size: int = arg(32, "Completions per evaluation forward.")


@dataclass(frozen=True)
class Comparison:
    """K >= 2 completions of one prompt, best first; ``ranking`` is their order (0..K-1)."""

    prompt: object
    completions: tuple
    margin: float | None = None


def load_comparisons(spec: str, ranking_loss: RankingLoss, *, config: str = "", seed: int = 0) -> list[Comparison]:
    problems: list[str] = []
    out: list[Comparison] = []
    for rec in read_records(spec, config=config, seed=seed):
        if ranking_loss != "pairs" and ("completions" in rec.data or "ranking" in rec.data):
            r = parse_ranking(rec, problems)
            if r:
                out.append(Comparison(r.prompt, tuple(r.completions[i] for i in r.ranking)))
            continue
        for p in parse_preference(rec, problems):
            out.append(Comparison(p.prompt, (p.chosen, p.rejected), p.margin))
    if problems:
        raise InputError(problems)
    return out


def comparison_losses(rewards: list[torch.Tensor], comparisons: list[Comparison], cfg: Config) -> torch.Tensor:
    """One loss per comparison; ``rewards[i]`` are the scores of comparison i's completions, best first."""
    losses = []
    for r, comp in zip(rewards, comparisons):
        if len(r) == 2:
            use_margin = cfg.use_margin and comp.margin is not None
            margin = torch.tensor(comp.margin, device=r.device) if use_margin else None
            losses.append(bradley_terry_loss(r[0:1], r[1:2], margin))
        elif cfg.ranking_loss == "listwise":
            losses.append(listwise_loss(r.unsqueeze(0), torch.zeros(1, dtype=torch.long, device=r.device)))
        else:
            losses.append(plackett_luce_loss(r.unsqueeze(0), torch.arange(len(r), device=r.device).unsqueeze(0)))
    return torch.cat(losses)


def comparison_inputs(tokenizer, comparisons: list[Comparison], max_length: int) -> dict:
    """Every completion of the comparisons as one padded reward-model batch."""
    prompts = [c.prompt for c in comparisons for _ in c.completions]
    completions = [x for c in comparisons for x in c.completions]
    return reward_inputs(tokenizer, prompts, completions, max_length)


def apply_length_policy(tokenizer, comparisons: list[Comparison], cfg: Config, run: Run | None = None):
    """--max-length and --truncation for reward inputs (:mod:`rlhfkit.data.length`): a comparison
    holding a longer sequence is dropped, or kept and cut from the left by reward_inputs."""
    longest = []
    for i in range(0, len(comparisons), 64):
        chunk = comparisons[i:i + 64]
        lengths = comparison_inputs(tokenizer, chunk, 10**9)["attention_mask"].sum(-1)
        longest += [int(n.max()) for n in split_rewards(lengths, chunk)]
    return length.apply_length_policy(zip(comparisons, longest), lambda item: (item[0], item[1] > cfg.max_length),
                                      source=cfg.data, max_length=cfg.max_length, truncation=cfg.truncation,
                                      say=run.print if run is not None else None)


def split_rewards(flat: torch.Tensor, comparisons: list[Comparison]) -> list[torch.Tensor]:
    return list(torch.split(flat, [len(c.completions) for c in comparisons]))


def score_comparisons(model, tokenizer, comparisons: list[Comparison], max_length: int) -> list[torch.Tensor]:
    """Score every completion of the comparisons in one forward; split back per comparison."""
    return split_rewards(forward_rewards(model, comparison_inputs(tokenizer, comparisons, max_length)), comparisons)


@torch.no_grad()
def score_pairs(model, tokenizer, comparisons: list[Comparison], max_length: int, batch_size: int):
    """(chosen, rejected) score lists for the pairs (best vs worst completion of each comparison)."""
    model.eval()
    chosen, rejected = [], []
    step = max(1, batch_size // 2)
    for i in range(0, len(comparisons), step):
        for r in score_comparisons(model, tokenizer, comparisons[i:i + step], max_length):
            chosen.append(float(r[0]))
            rejected.append(float(r[-1]))
    model.train()
    return chosen, rejected


def build_model(cfg: Config, tokenizer, device=None):
    """The scalar-head model to train on ``device`` (the accelerator's) in --dtype, or quantized
    (QLoRA); see :func:`rlhfkit.models.loading.prepare_for_training`."""
    from rlhfkit.models.loading import prepare_for_training
    from rlhfkit.models.reward import load_reward_backbone

    model = load_reward_backbone(cfg.model, tokenizer, cfg.dtype, device, cfg.quantization_bits)
    return prepare_for_training(model, cfg, "SEQ_CLS")


@dataclass
class RewardModelResult(TrainResult):
    """``reward_offset``: the shift stored in the model's config (--normalize), else None."""

    reward_offset: float | None = None


def train(cfg: Config, run: Run) -> RewardModelResult:
    from rlhfkit.models.loading import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    data = apply_length_policy(tokenizer, load_comparisons(cfg.data, cfg.ranking_loss, config=cfg.data_config,
                                                           seed=cfg.seed), cfg, run)
    eval_data = load_comparisons(cfg.eval_data, "pairs", config=cfg.data_config, seed=cfg.seed) \
        if cfg.eval_data else []

    training = setup_training(run, cfg, build_model(cfg, tokenizer, run.accelerator.device), len(data))
    model = training.model

    def loss_fn(indices: list[int]):
        comparisons = [data[i] for i in indices]
        batch = comparison_inputs(tokenizer, comparisons, cfg.max_length)
        rewards = split_rewards(forward_rewards(model, batch), comparisons)
        losses = comparison_losses(rewards, comparisons, cfg)
        correct = sum(float(r[0] > r[1:].max()) for r in (r.detach() for r in rewards))
        margins = sum(float(r[0] - r[-1]) for r in (r.detach() for r in rewards))
        return losses.sum(), {"train/accuracy": correct, "train/margin": margins,
                              "tokens": batch["attention_mask"].sum()}

    def evaluate() -> dict[str, float]:
        scores = score_pairs(model, tokenizer, eval_data, cfg.max_length, cfg.eval_batch_size)
        return {f"eval/{k}": v for k, v in agreement(*scores).items()}

    logged = fit(run, cfg, training, loss_fn, desc="rm", per_example=("train/accuracy", "train/margin"),
                 postfix={"acc": "train/accuracy"}, evaluate=evaluate if eval_data else None)
    final_model, offset = save_reward_model(run, cfg, model, tokenizer, data)
    return RewardModelResult.of(run, logged, final_model, reward_offset=offset)


def save_reward_model(run: Run, cfg: Config, model, tokenizer, data: list[Comparison]) -> tuple[Path, float | None]:
    """Save a folder transformers loads directly (always merged), with the --normalize offset in its config."""
    final = run.accelerator.unwrap_model(model)
    if cfg.lora_r:
        final = final.merge_and_unload()
    offset = None
    if cfg.normalize:
        chosen, rejected = score_pairs(final, tokenizer, data[:512], cfg.max_length, cfg.eval_batch_size)
        offset = (sum(chosen) + sum(rejected)) / (len(chosen) + len(rejected))
        setattr(final.config, OFFSET_KEY, offset)
    return save_final_model(run, final, tokenizer), offset


def main(cfg: Config) -> int:
    with start_run(validated(cfg)) as run:
        metrics = train(cfg, run).metrics
    if "eval/accuracy" in metrics:
        run.print(f"rm done: eval accuracy {metrics['eval/accuracy']:.3f} "
                  f"(margin {metrics['eval/margin']:.3f}); model saved to {run.output}")
    else:
        run.print(f"rm done: loss {metrics.get('loss', float('nan')):.4f}; model saved to {run.output}")
    return 0
