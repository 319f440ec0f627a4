"""Rejection-sampling fine-tuning (Llama 2 style): sample N, keep the best, fine-tune, repeat.

    0. sample --samples-per-prompt completions per prompt from the initial policy π_0 and score them with --reward
    for each round k = 1..K:
    1. keep the --keep-top best completions of each prompt (by reward): round-k/sft.jsonl
    2. fine-tune the previous policy on them with the SFT recipe (rlhfkit.recipes.sft.train):
       round-k/ holds the new policy π_k (a full model; LoRA runs are merged each round)
    3. sample N completions per prompt from π_k and score them: the next round's candidates,
       and the measure of π_k. KL(π_k ‖ π_0) is estimated on them (evaluation.divergence.
       kl_to_reference): mean over samples of Σ_t log π_k(y_t|·) − log π_0(y_t|·) (k1; exact in
       expectation when sampling at temperature 1 without top-p/top-k truncation)
    4. log one row per round in metrics.jsonl: reward/mean_all and reward/mean_kept (the samples
       of π_{k-1} that round k chose from), reward/mean_policy (π_k's samples), objective/kl

--resume skips the rounds whose folder is complete (round-k/round.json) and resumes the
interrupted round's fine-tuning from its newest checkpoint.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

from rlhfkit.config import (
    GENERATION_BATCH_HELP,
    PROMPTS_HELP,
    REWARD_GATE_HELP,
    REWARD_HELP,
    REWARD_WEIGHT_HELP,
    TrainConfig,
    arg,
    flag,
    validated,
)
from rlhfkit.data.chat import encode_prompt
from rlhfkit.data.io import write_jsonl
from rlhfkit.data.schema import load_prompts
from rlhfkit.evaluation.divergence import kl_to_reference
from rlhfkit.generation.best_of_n import score_completions
from rlhfkit.generation.decoding import SamplingParams, decode_response, generate_ids
from rlhfkit.models.packed import Group
from rlhfkit.recipes import sft
from rlhfkit.training import Run, TrainResult, list_checkpoints, start_run


@dataclass
class Config(TrainConfig):
    """Rejection-sampling fine-tuning: sample N per prompt, keep the best by reward, SFT, repeat."""

    input_field = "prompts"

    model: str = arg("smollm2-135m", "Initial policy: a local path, hub id, or embedded name.", aliases=("policy",))
    reward: list[str] = arg(default_factory=list, help=REWARD_HELP)
    reward_weight: list[float] = arg(default_factory=list, help=REWARD_WEIGHT_HELP)
    reward_gate: str = arg("", REWARD_GATE_HELP)
    prompts: str = arg("", PROMPTS_HELP)
    rounds: int = arg(1, "Rounds of sample -> select -> fine-tune.")
    samples_per_prompt: int = arg(4, "Completions sampled per prompt in each round.", aliases=("n",))
    keep_top: int = arg(1, "Completions kept per prompt (the best by reward).", aliases=("top_k",))
    temperature: float = arg(1.0, "Sampling temperature.")
    top_p: float = arg(1.0, "Nucleus sampling threshold (1: off).")
    max_new_tokens: int = arg(64, "Maximum tokens per sampled completion.")
    generation_batch_size: int = arg(8, GENERATION_BATCH_HELP, aliases=("gen_batch_size",))
    lr: float = arg(2e-5, "Peak learning rate of each round's fine-tuning (AdamW).")
    # The SFT recipe's --data is set per round (the kept completions): not an option here.
    data: str = field(default="", init=False)

    def validate(self) -> list[str]:
        from rlhfkit.rl.rewards import check_reward_combination

        problems = super().validate()
        problems += check_reward_combination(self.reward, self.reward_weight, self.reward_gate)
        for name in ("rounds", "samples_per_prompt", "keep_top", "max_new_tokens", "generation_batch_size"):
            if getattr(self, name) < 1:
                problems.append(f"--{flag(name)} must be >= 1")
        if self.keep_top > self.samples_per_prompt:
            problems.append(f"--keep-top {self.keep_top} keeps more than the --samples-per-prompt "
                            f"{self.samples_per_prompt} samples")
        if self.temperature <= 0:
            problems.append("--temperature must be > 0")
        if not 0 < self.top_p <= 1:
            problems.append("--top-p must be in (0, 1]")
        return problems

    def _quantization_problems(self) -> list[str]:
        if not self.quantization_bits:
            return []
        return [f"--load-in-{self.quantization_bits}bit: rejection-sampling merges each round's adapters into a "
                "full model, which quantized weights cannot hold; use it with sft, rm, dpo or ppo"]

    def sampling_params(self, round_index: int) -> SamplingParams:
        return SamplingParams(strategy="sample", n=self.samples_per_prompt, temperature=self.temperature,
                              top_p=self.top_p, max_new_tokens=self.max_new_tokens, seed=self.seed + 1000 * round_index)

    def sft_config(self, model: str, data: str, output: str) -> sft.Config:
        """The SFT recipe's config for one round: every common training flag passes through."""
        common = {f.name: getattr(self, f.name) for f in fields(TrainConfig) if f.init}
        common.update(model=model, data=data, output=output, eval_data=self.eval_data,
                      merge_lora=bool(self.lora_r))  # each round starts from a full model
        return sft.Config(**common)


@dataclass
class Samples:
    """N completions per prompt, as token ids and text, with their rewards."""

    prompt_ids: list[list[int]]
    response_ids: list[list[list[int]]]
    texts: list[list[str]]
    scores: list[list[float]]

    def mean(self) -> float:
        flat = [s for row in self.scores for s in row]
        return sum(flat) / len(flat)


def sample(model, tokenizer, prompts: list, reward, params: SamplingParams, batch_size: int) -> Samples:
    prompt_ids = [encode_prompt(tokenizer, p) for p in prompts]
    responses = generate_ids(model, tokenizer, prompt_ids, params, batch_size)
    texts = [[decode_response(tokenizer, r) for r in rows] for rows in responses]
    return Samples(prompt_ids, responses, texts, score_completions(reward, prompts, texts))


def keep_best(samples: Samples, k: int) -> list[list[int]]:
    """Indices of the k highest-scoring completions of each prompt (best first, first on ties)."""
    return [sorted(range(len(s)), key=lambda i: (-s[i], i))[:k] for s in samples.scores]


def sample_groups(samples: Samples) -> list[Group]:
    """Each prompt with its sampled completions, for :func:`~rlhfkit.evaluation.divergence.kl_to_reference`."""
    return [Group(p, rows) for p, rows in zip(samples.prompt_ids, samples.response_ids)]


def write_samples(path: Path, prompts: list, samples: Samples) -> None:
    write_jsonl(str(path), [{"prompt": p, "completions": t, "scores": s}
                            for p, t, s in zip(prompts, samples.texts, samples.scores)])


@dataclass
class RejectionSamplingResult(TrainResult):
    """``rounds``: the round-k/ folders, each a fine-tuned policy (the last is ``final_model``);
    ``final_samples``: the final policy's samples and their rewards."""

    rounds: list[Path] = field(default_factory=list)
    final_samples: Path | None = None


def train(cfg: Config, run: Run) -> RejectionSamplingResult:
    from rlhfkit.models.loading import load_policy
    from rlhfkit.rl.rewards import build_reward

    examples = load_prompts(cfg.prompts, config=cfg.data_config, seed=cfg.seed)
    prompts = [ex.prompt for ex in examples]
    device = run.accelerator.device
    reward = build_reward(cfg.reward, cfg.reward_weight, cfg.reward_gate, cfg.dtype, device)
    initial, tokenizer = load_policy(cfg.model, cfg.dtype, device)

    done, rows = 0, []
    if cfg.resume:
        while (run.output / f"round-{done + 1}" / "round.json").exists():
            done += 1
        run.metrics.truncate_after(done)
    current = cfg.model if done == 0 else str(run.output / f"round-{done}")
    policy = initial if done == 0 else load_policy(current, cfg.dtype, device)[0]
    samples = sample(policy, tokenizer, prompts, reward, cfg.sampling_params(done), cfg.generation_batch_size)
    if done == 0:
        rows.append(run.metrics.log({"step": 0, "round": 0, "reward/mean_policy": samples.mean(), "objective/kl": 0.0,
                                     "elapsed_s": time.time() - run.started}))
        run.print(f"round 0: mean reward of the initial policy {samples.mean():.4f}")

    for k in range(done + 1, cfg.rounds + 1):
        folder = run.output / f"round-{k}"
        folder.mkdir(parents=True, exist_ok=True)
        # 1. keep the best completions of each prompt
        write_samples(folder / "samples.jsonl", prompts, samples)
        kept = keep_best(samples, cfg.keep_top)
        write_jsonl(str(folder / "sft.jsonl"), [{"prompt": p, "completion": samples.texts[i][j]}
                                                for i, p in enumerate(prompts) for j in kept[i]
                                                if samples.texts[i][j].strip()])
        kept_scores = [samples.scores[i][j] for i in range(len(prompts)) for j in kept[i]]
        # 2. fine-tune the previous policy on them with the SFT recipe
        sft_cfg = cfg.sft_config(current, str(folder / "sft.jsonl"), str(folder))
        with start_run(sft_cfg) as round_run:
            sft_metrics = sft.train(sft_cfg, round_run).metrics
        for ckpt in list_checkpoints(folder):  # the round's model is saved: its checkpoints are not needed
            shutil.rmtree(ckpt, ignore_errors=True)
        del policy
        current = str(folder)
        policy = load_policy(current, cfg.dtype, device)[0]
        # 3. sample from the new policy: its measure, and the next round's candidates
        new_samples = sample(policy, tokenizer, prompts, reward, cfg.sampling_params(k), cfg.generation_batch_size)
        kl = kl_to_reference(policy, initial, sample_groups(new_samples), batch_size=4)
        row = {"step": k, "round": k, "reward/mean_all": samples.mean(),
               "reward/mean_kept": sum(kept_scores) / len(kept_scores),
               "reward/mean_policy": new_samples.mean(), "objective/kl": kl,
               "sft/loss": sft_metrics.get("loss"), "kept": len(kept_scores),
               "elapsed_s": time.time() - run.started}
        rows.append(run.metrics.log(row))
        (folder / "round.json").write_text(json.dumps(row, indent=1))
        run.print(f"round {k}: reward all {row['reward/mean_all']:.4f}, kept {row['reward/mean_kept']:.4f} "
                  f"-> new policy {row['reward/mean_policy']:.4f}, KL to initial {kl:.4f}")
        samples = new_samples
    write_samples(run.output / "final_samples.jsonl", prompts, samples)
    return RejectionSamplingResult.of(run, rows, Path(current), final_samples=run.output / "final_samples.jsonl",
                                      rounds=[run.output / f"round-{k}" for k in range(1, cfg.rounds + 1)])


def main(cfg: Config) -> int:
    with start_run(validated(cfg)) as run:
        result = train(cfg, run)
    run.print(f"rejection sampling done: {cfg.rounds} round(s); final policy in {result.final_model}")
    return 0
