"""RL against a reward with a KL penalty towards the initial policy: PPO, RLOO or GRPO.

    1. load the prompts and the reward source; the policy (full or LoRA), the reference (a
       frozen copy, or the same weights with the LoRA adapters disabled) and, for PPO, the
       value function (a head on the policy trunk or a separate critic); optimizer, schedule,
       KL controller; resume
    2. for each iteration (a fixed, seeded set of --batch-size prompts):
       a. rollout: sample --samples-per-prompt completions each (KV cache), then the policy and
          reference log-probs and the values in no-grad passes       -> Rollout (immutable)
       b. score: the reward source on (prompt, completion) text (several rewards: their
          weighted / gated combination, each one logged: :func:`rlhfkit.rl.rewards.build_reward`)
       c. shape_rewards: missing-EOS penalty, score clipping, the KL penalty on the real
          response tokens (in the reward, InstructGPT style, or later in the loss)
       d. compute_advantages: GAE (ppo) or the RLOO / GRPO group baselines (critic-free)
       e. update: --ppo-epochs passes over shuffled minibatches: clipped policy loss, clipped
          value loss, KL loss (--kl-in loss), gradient clipping; with --ptx-data, γ × the SFT
          loss of a seeded batch of demonstrations per step (PPO-ptx, :mod:`rlhfkit.rl.ptx`)
       f. the adaptive KL controller; metrics.jsonl, samples.jsonl; checkpoint-N/ + policy-N/
    3. save the final policy (loadable by transformers) in --output

See docs/ppo.md for where the KL goes, the estimators and every flag.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from rlhfkit.config import (
    GENERATION_BATCH_HELP,
    PROMPTS_HELP,
    REWARD_GATE_HELP,
    REWARD_HELP,
    REWARD_WEIGHT_HELP,
    TrainConfig,
    arg,
    check_data_flag,
    validated,
)
from rlhfkit.generation.decoding import SAMPLE_DTYPE_HELP, DecodingCopy, DecodingDtype, SamplingParams
from rlhfkit.losses import KL_ESTIMATORS, masked_mean, masked_whiten, ppo_policy_loss, value_loss
from rlhfkit.rl import shaping
from rlhfkit.rl.advantages import gae, grpo_advantages, rloo_advantages
from rlhfkit.rl.kl_control import AdaptiveKLController, FixedKLController
from rlhfkit.rl.metrics import kl_by_estimator, repeated_ngram_rate
from rlhfkit.rl.ptx import PtxData, demo_tokens, ptx_loss_sum
from rlhfkit.rl.rewards import score_parts
from rlhfkit.rl.rollout import Rollout, forward_response, rollout, score
from rlhfkit.rl.value import ActorCritic
from rlhfkit.training import (
    Run,
    Training,
    TrainResult,
    optimizer_step,
    run_steps,
    save_checkpoint,
    save_final_model,
    seed_everything,
    setup_training,
    start_run,
)

DEFAULT_POLICY = "smollm2-135m"
ALGOS = ("ppo", "rloo", "grpo")


@dataclass
class Config(TrainConfig):
    """RL against a reward with a KL penalty towards the initial policy: PPO, RLOO or GRPO."""

    input_field = "prompts"

    model: str = arg(DEFAULT_POLICY, "The policy to train: a local path, a LoRA adapter folder, a hub id or "
                     "an embedded name (smollm2-135m). Its initial weights are the KL reference.",
                     aliases=("policy",))
    prompts: str = arg("", PROMPTS_HELP, aliases=("data",))
    data: str = field(default="", init=False)  # not an option here: the input is --prompts
    reward: list[str] = arg(default_factory=list, help=REWARD_HELP)
    reward_weight: list[float] = arg(default_factory=list, help=REWARD_WEIGHT_HELP)
    reward_gate: str = arg("", REWARD_GATE_HELP)
    algo: Literal["ppo", "rloo", "grpo"] = arg("ppo", "ppo: GAE with a value function; rloo: leave-one-out "
                                              "baseline; grpo: group-normalised advantages, k3 KL in the loss.")
    value_model: str = arg("head", "PPO's value function: `head` (a linear head on the policy trunk, same "
                           "forward pass) or a model path / reward-model folder for a separate critic "
                           "(same tokenizer as the policy).")
    max_steps: int = arg(0, "Rollout-and-update iterations; 0 derives them from --epochs over the prompts.")
    batch_size: int = arg(8, "Prompts per iteration.")
    samples_per_prompt: int = arg(0, "Completions sampled per prompt; 0 means 1 for ppo and 4 for rloo/grpo "
                                  "(which need >= 2).")
    max_new_tokens: int = arg(64, "Most tokens sampled per completion.")
    temperature: float = arg(1.0, "Sampling temperature; the log-probs, the KL and the ratio are those of the "
                             "temperature-scaled policy.")
    top_p: float = arg(1.0, "Nucleus sampling (1 disables; below 1 the sampler differs from the policy "
                       "whose log-probs are optimised).")
    top_k: int = arg(0, "Top-k sampling (0 disables; same caveat as --top-p).")
    ppo_epochs: int = arg(0, "Passes over each rollout batch; 0 means 4 for ppo (InstructGPT) and 1 for "
                          "rloo/grpo (one pass, as TRL's num_iterations=1 and the GRPO/RLOO papers).")
    minibatch_size: int = arg(0, "Samples per optimizer step; 0: the whole rollout batch "
                              "(--batch-size × --samples-per-prompt must be a multiple of it).")
    grad_accum: int = arg(1, "Micro-batches each minibatch is split into (memory only: same gradient).")
    kl_coef: float = arg(0.05, "β, the KL penalty coefficient (the initial β with --target-kl).")
    kl_estimator: Literal["auto", "k1", "k2", "k3"] = arg(
        "auto", "Per-token KL estimator for the penalty (Schulman): k1 = log π/π_ref, k2 = ½(log π/π_ref)², "
        "k3 = (r − 1) − log r; auto: k3 for grpo, k1 otherwise. All three are logged.")
    kl_in: Literal["auto", "reward", "loss"] = arg(
        "auto", "Where the KL penalty goes: subtracted from the reward (InstructGPT) or added to the loss "
        "(GRPO); auto: loss for grpo, reward otherwise.")
    target_kl: float = arg(0.0, "Adaptive KL controller (Ziegler et al.): the target KL per response "
                           "(summed over its tokens); 0 keeps β fixed.")
    kl_horizon: float = arg(10000.0, "Adaptive KL controller horizon, in samples.")
    cliprange: float = arg(0.2, "PPO ratio clip ε.")
    cliprange_value: float = arg(0.2, "Value clip around the rollout values.")
    vf_coef: float = arg(0.1, "Weight of the value loss.")
    value_lr: float = arg(0.0, "Learning rate of the value head or critic (0: --lr). A fresh zero-initialised "
                          "head barely moves at a policy's learning rate within a few dozen updates, and "
                          "GAE (λ < 1) on a near-zero value gives early tokens only λ^(T−t) of the score.")
    gamma: float = arg(1.0, "Discount factor of GAE.")
    lam: float = arg(0.95, "λ of GAE.")
    whiten_rewards: bool = arg(False, "Rescale the rewards to unit variance over the batch (mean kept).")
    missing_eos_penalty: float = arg(0.0, "Subtracted from the score of a completion that never emits EOS "
                                     "(0 disables).")
    score_clip: float = arg(0.0, "Clip scores to [-c, c] (0 disables).")
    sample_every: int = arg(10, "Write the iteration's completions and scores to samples.jsonl every N "
                            "iterations (0 disables).")
    sample_dtype: DecodingDtype = arg("float32", SAMPLE_DTYPE_HELP)
    generation_batch_size: int = arg(0, GENERATION_BATCH_HELP + " Also bounds the rows of each no-grad pass "
                                     "(× --samples-per-prompt). 0: the whole batch.",
                                     aliases=("rollout_batch_size",))
    ptx_data: str = arg("", "PPO-ptx (InstructGPT): demonstrations in the SFT schema (what `rlhfkit sft` reads); "
                        "each optimizer step adds --ptx-coef × their SFT loss on a seeded batch of them.")
    ptx_coef: float = arg(0.0, "γ, the weight of the --ptx-data SFT loss (InstructGPT eq. 2); needs --ptx-data.")
    ptx_batch_size: int = arg(0, "Demonstrations per optimizer step with --ptx-data (0: as many as the minibatch "
                              "has samples).")
    logging_steps: int = arg(1, "Write a metrics row every N iterations.")
    save_steps: int = arg(0, "Write checkpoint-N/ and policy-N/ every N iterations (0: only at the end).")
    save_total_limit: int = arg(2, "Keep at most this many checkpoint-N/ folders (0: all); policy-N/ "
                                "snapshots are always kept.")

    def __post_init__(self):
        if self.algo in ALGOS:
            grpo = self.algo == "grpo"
            if self.samples_per_prompt == 0:
                self.samples_per_prompt = 1 if self.algo == "ppo" else 4
            if self.ppo_epochs == 0:
                self.ppo_epochs = 4 if self.algo == "ppo" else 1
            if self.kl_estimator == "auto":
                self.kl_estimator = "k3" if grpo else "k1"
            if self.kl_in == "auto":
                self.kl_in = "loss" if grpo else "reward"

    @property
    def rollout_size(self) -> int:
        """Samples per iteration: prompts × samples per prompt."""
        return self.batch_size * self.samples_per_prompt

    def validate(self) -> list[str]:
        from rlhfkit.rl.rewards import check_reward_combination

        problems = super().validate()
        if self.eval_data:
            problems.append("--eval-data is not used by ppo")
        problems += check_reward_combination(self.reward, self.reward_weight, self.reward_gate)
        if self.algo != "ppo" and self.value_model != "head":
            problems.append(f"--value-model is for --algo ppo only ({self.algo} has no value function)")
        if self.value_model != "head" and not _could_be_model(self.value_model):
            problems.append(f"--value-model: no such model folder: {self.value_model}")
        for name in ("max_new_tokens", "ppo_epochs", "samples_per_prompt"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(self, name)})")
        if self.value_lr and self.algo != "ppo":
            problems.append(f"--value-lr is for --algo ppo only ({self.algo} has no value function)")
        if bool(self.ptx_data) != (self.ptx_coef > 0):
            problems.append("--ptx-coef > 0 and --ptx-data go together (PPO-ptx needs both)")
        if self.ptx_data:
            problems += check_data_flag("ptx_data", self.ptx_data)
        for name in ("minibatch_size", "top_k", "sample_every", "generation_batch_size", "kl_coef", "value_lr",
                     "target_kl", "vf_coef", "missing_eos_penalty", "score_clip", "ptx_coef", "ptx_batch_size"):
            if getattr(self, name) < 0:
                problems.append(f"--{name.replace('_', '-')} must be >= 0 (got {getattr(self, name)})")
        if self.algo in ("rloo", "grpo") and self.samples_per_prompt < 2:
            problems.append(f"--algo {self.algo} needs --samples-per-prompt >= 2 (got {self.samples_per_prompt})")
        if self.max_length <= self.max_new_tokens:
            problems.append(f"--max-length ({self.max_length}) must exceed --max-new-tokens "
                            f"({self.max_new_tokens}): it bounds prompt plus completion")
        if self.temperature <= 0:
            problems.append(f"--temperature must be > 0 (got {self.temperature})")
        if not 0 < self.top_p <= 1:
            problems.append(f"--top-p must be in (0, 1] (got {self.top_p})")
        for name in ("cliprange", "cliprange_value", "kl_horizon"):
            if getattr(self, name) <= 0:
                problems.append(f"--{name.replace('_', '-')} must be > 0 (got {getattr(self, name)})")
        for name in ("gamma", "lam"):
            if not 0 <= getattr(self, name) <= 1:
                problems.append(f"--{name} must be in [0, 1] (got {getattr(self, name)})")
        n = self.rollout_size
        if self.minibatch_size and self.samples_per_prompt >= 1 and self.batch_size >= 1:
            if self.minibatch_size > n or n % self.minibatch_size:
                problems.append(f"--minibatch-size {self.minibatch_size} must divide the rollout batch "
                                f"(--batch-size × --samples-per-prompt = {n})")
        mb = self.minibatch_size or n
        if self.grad_accum >= 1 and mb >= 1 and mb % self.grad_accum:
            problems.append(f"--grad-accum {self.grad_accum} must divide the minibatch ({mb} samples)")
        return problems


def _could_be_model(name: str) -> bool:
    from rlhfkit.models.loading import EMBEDDED_MODELS

    parts = name.split("/")
    looks_like_hub_id = len(parts) == 2 and all(parts) and not name.startswith((".", "/"))
    return os.path.exists(name) or name in EMBEDDED_MODELS or looks_like_hub_id


def iteration_seed(seed: int, iteration: int) -> int:
    """The seed of iteration ``iteration``: sampling and minibatch order depend on nothing else,
    so a resumed run draws exactly what the uninterrupted run drew."""
    return seed * 1_000_003 + iteration


# ---------------------------------------------------------------- 1. setup


def load_prompt_data(cfg: Config, tokenizer, run: Run) -> list:
    """The prompts (raw: strings or message lists), after the length policy (:mod:`rlhfkit.data.length`):
    a prompt longer than --max-length − --max-new-tokens is dropped, or kept and cut from the left
    by the rollout."""
    from rlhfkit.data.chat import encode_prompt
    from rlhfkit.data.length import apply_length_policy
    from rlhfkit.data.schema import load_prompts

    limit = cfg.max_length - cfg.max_new_tokens
    return apply_length_policy(load_prompts(cfg.prompts, config=cfg.data_config, seed=cfg.seed),
                               lambda ex: (ex.prompt, len(encode_prompt(tokenizer, ex.prompt)) > limit),
                               source=cfg.prompts, max_length=limit, truncation=cfg.truncation,
                               limit=f"{limit} prompt tokens (--max-length minus --max-new-tokens)", say=run.print)


def build_models(cfg: Config, device=None):
    """(tokenizer, ActorCritic, reference) on ``device`` (the accelerator's) in --dtype: the
    reference is None with LoRA (adapters disabled), else a frozen copy of the initial policy.
    Also the policy and reference of ``dpo --online`` (a config without ``algo``: no value function)."""
    from rlhfkit.models.loading import load_causal_lm, load_tokenizer, prepare_for_training, torch_dtype
    from rlhfkit.recipes.dpo import disable_dropout
    from rlhfkit.rl.value import ValueHead, load_critic

    tokenizer = load_tokenizer(cfg.model)
    policy = load_causal_lm(cfg.model, cfg.dtype, device, cfg.quantization_bits)
    if hasattr(policy, "merge_and_unload"):  # an adapter folder (e.g. LoRA SFT): start from the merged model
        policy = policy.merge_and_unload()
    if policy.config.pad_token_id is None:
        policy.config.pad_token_id = tokenizer.pad_token_id
    reference = None if cfg.lora_r else copy.deepcopy(policy).requires_grad_(False).eval()
    policy = prepare_for_training(policy, cfg)
    value_head = critic = None
    if getattr(cfg, "algo", None) == "ppo":  # rloo, grpo and `dpo --online` (no algo) have no value function
        if cfg.value_model == "head":
            hidden_size = policy.config.get_text_config().hidden_size
            value_head = ValueHead(hidden_size, torch_dtype(cfg.dtype)).to(next(policy.parameters()).device)
        else:
            critic = load_critic(cfg.value_model, tokenizer, cfg.dtype, device, cfg.gradient_checkpointing)
    model = ActorCritic(policy, value_head, critic)
    # No dropout anywhere, so the PPO ratio is exactly 1 before the first update. Dropout is
    # switched off in the modules rather than by eval mode alone, because the update runs in
    # training mode with --gradient-checkpointing (transformers checkpoints only in training mode).
    disable_dropout(model, adapters=True)
    model.eval()
    return tokenizer, model, reference


def make_kl_controller(cfg: Config):
    if cfg.target_kl > 0:
        return AdaptiveKLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon)
    return FixedKLController(cfg.kl_coef)


def sampling_params(cfg: Config) -> SamplingParams:
    return SamplingParams(strategy="sample", max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                          top_k=cfg.top_k, top_p=cfg.top_p, n=cfg.samples_per_prompt)


# ---------------------------------------------------------------- 2c. reward shaping


@dataclass(frozen=True)
class Shaped:
    """Rewards of one rollout after shaping."""

    scores: Tensor            # [N] after the missing-EOS penalty and clipping
    kl: Tensor                # [N, R] per-token KL by --kl-estimator, 0 off the response mask
    token_rewards: Tensor     # [N, R] ppo: the score at the last real token, −β·kl on each real token
    sequence_rewards: Tensor  # [N] rloo / grpo: score − β·Σ_t kl_t
    kl_coef: float            # β this iteration


def shape_rewards(batch: Rollout, cfg: Config, kl_coef: float) -> Shaped:
    """Scores -> rewards: penalty, clipping, and −β·KL when the KL goes in the reward.

    Only the real response tokens carry KL (``batch.response_mask``); padding and what follows
    EOS contribute nothing. With ``--kl-in loss`` the rewards are the bare scores and the KL is
    added to the loss in :func:`update` instead.
    """
    mask = batch.response_mask
    scores = batch.scores
    if cfg.missing_eos_penalty:
        scores = shaping.penalize_missing_eos(scores, batch.has_eos, cfg.missing_eos_penalty)
    scores = shaping.clip_scores(scores, cfg.score_clip or None)
    beta = kl_coef if cfg.kl_in == "reward" else 0.0
    token_rewards, kl = shaping.shape_rewards(scores, batch.logprobs, batch.ref_logprobs, mask, beta,
                                              cfg.kl_estimator)
    sequence_rewards = scores - beta * kl.sum(dim=1)
    if cfg.whiten_rewards:
        if mask.sum() >= 2:
            token_rewards = masked_whiten(token_rewards, mask, shift_mean=False)
        if sequence_rewards.numel() >= 2:
            sequence_rewards = masked_whiten(sequence_rewards, torch.ones_like(mask[:, 0]), shift_mean=False)
    return Shaped(scores, kl, token_rewards, sequence_rewards, kl_coef)


# ---------------------------------------------------------------- 2d. advantages


def compute_advantages(batch: Rollout, shaped: Shaped, cfg: Config) -> tuple[Tensor, Tensor | None]:
    """(advantages, returns). ppo: GAE per token, whitened over the real tokens, and the value
    targets; rloo / grpo: one advantage per sample ``[N, 1]`` from its group, no returns."""
    if cfg.algo == "ppo":
        mask = batch.response_mask
        advantages, returns = gae(shaped.token_rewards, batch.values, mask, cfg.gamma, cfg.lam)
        if mask.sum() >= 2:
            advantages = masked_whiten(advantages, mask)
        return advantages, returns
    estimator = rloo_advantages if cfg.algo == "rloo" else grpo_advantages
    return estimator(shaped.sequence_rewards, cfg.samples_per_prompt).unsqueeze(1), None


# ---------------------------------------------------------------- 2e. update


def minibatch_loss(model, batch: Rollout, advantages: Tensor, returns: Tensor | None, cfg: Config,
                   kl_coef: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Token-summed loss of one micro-batch (``optimizer_step`` divides by the minibatch tokens).

        L = L_clip(π) + vf_coef·L_V + [--kl-in loss] β·k(π, π_ref)     (each a token mean)
    """
    mask = batch.response_mask
    out = forward_response(model, batch.prompt_ids, batch.prompt_mask, batch.response_ids, mask,
                           cfg.temperature, with_values=returns is not None)
    device = out.logprobs.device
    mask = mask.to(device)
    loss, pg = ppo_policy_loss(out.logprobs, batch.logprobs.to(device), advantages.to(device), mask, cfg.cliprange)
    stats = {"pg_loss": loss.detach(), "pg_clipfrac": pg["clipfrac"], "approxkl": pg["approxkl"],
             "ratio": pg["ratio"]}
    if returns is not None:
        vf_loss, vf_clipfrac = value_loss(out.values, batch.values.to(device), returns.to(device), mask,
                                          cfg.cliprange_value)
        loss = loss + cfg.vf_coef * vf_loss
        stats.update(vf_loss=vf_loss.detach(), vf_clipfrac=vf_clipfrac)
    if cfg.kl_in == "loss" and kl_coef > 0:
        kl = masked_mean(KL_ESTIMATORS[cfg.kl_estimator](out.logprobs, batch.ref_logprobs.to(device)), mask)
        loss = loss + kl_coef * kl
        stats["kl_loss"] = kl.detach()
    tokens = mask.sum()
    weighted = {k: v * tokens for k, v in stats.items()}
    return loss * tokens, {"tokens": tokens, **weighted}


def total_over_processes(run: Run, local: Tensor) -> float:
    acc = run.accelerator
    if acc.num_processes == 1:
        return float(local)
    return float(acc.reduce(local.to(acc.device), reduction="sum"))


def with_ptx(loss_fn, policy, ptx: PtxData, demos: list, tokens: float, demo_total: float):
    """``loss_fn`` plus γ × the SFT loss of ``demos`` (split like the micro-batches): a micro-batch's
    demonstrations add γ·Σ nll·tokens/demo_total, so that once ``optimizer_step`` divides by the
    minibatch's ``tokens`` the step's loss holds γ × the token mean over all its demonstrations."""

    def loss_with_ptx(piece):
        index, part = piece
        loss, stats = loss_fn(index)
        if part:
            nll = ptx_loss_sum(policy, part, ptx.pad_id)
            loss = loss + ptx.coef * nll * (tokens / demo_total)
            stats["ptx_nll"] = nll.detach()
        return loss, stats

    return loss_with_ptx


def update(run: Run, model, optimizer, scheduler, batch: Rollout, advantages: Tensor, returns: Tensor | None,
           cfg: Config, kl_coef: float, iteration: int, ptx: PtxData | None = None) -> dict[str, float]:
    """--ppo-epochs passes over seeded random minibatches; one optimizer step per minibatch (plus,
    with ``ptx``, γ × the SFT loss of a seeded batch of demonstrations: :mod:`rlhfkit.rl.ptx`).

    Returns token-weighted means of the loss terms and statistics, the last learning rate and
    the mean gradient norm (before clipping).
    """
    n = batch.num_samples
    size = cfg.minibatch_size or n
    micro = size // cfg.grad_accum
    order_rng = torch.Generator().manual_seed(iteration_seed(cfg.seed, iteration))
    ptx_rng = ptx.generator(cfg.seed, iteration, run.accelerator.process_index) if ptx is not None else None
    totals: dict[str, float] = {}
    grad_norms, losses, demo_totals = [], [], []
    # dropout is off in every module (build_models): training mode only engages gradient checkpointing
    model.train(cfg.gradient_checkpointing)
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(n, generator=order_rng)
        for start in range(0, n, size):
            index = order[start:start + size]
            pieces = [index[i:i + micro] for i in range(0, size, micro)]

            def loss_fn(piece):
                return minibatch_loss(model, batch.select(piece), advantages[piece],
                                      None if returns is None else returns[piece], cfg, kl_coef)

            # the count over every process's minibatch: N processes then take the step one process takes on
            # the union of their samples (a per-process count would weight a process's tokens by its length)
            tokens = total_over_processes(run, batch.response_mask[index].sum())
            if ptx is not None:
                demos = ptx.draw(ptx_rng)
                demo_totals.append(max(total_over_processes(run, torch.tensor(demo_tokens(demos))), 1.0))
                loss_fn = with_ptx(loss_fn, run.accelerator.unwrap_model(model).policy, ptx, demos, tokens,
                                   demo_totals[-1])
                pieces = list(zip(pieces, [demos[i::cfg.grad_accum] for i in range(cfg.grad_accum)]))
            stats = optimizer_step(run, model, optimizer, scheduler, pieces, loss_fn, normalizer=tokens,
                                   max_grad_norm=cfg.max_grad_norm)
            grad_norms.append(stats.pop("grad_norm"))
            losses.append(stats.pop("loss"))
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + v
    tokens = max(totals.pop("tokens", 1.0), 1.0)
    ptx_avg = {"loss/ptx_avg": totals.pop("ptx_nll", 0.0) / sum(demo_totals)} if ptx is not None else {}
    mean = {k: v / tokens for k, v in totals.items()}
    return {**ptx_avg,
        "loss": sum(losses) / len(losses),
        "grad_norm": sum(grad_norms) / len(grad_norms),
        "learning_rate": scheduler.get_last_lr()[0],
        "policy/clipfrac_avg": mean.get("pg_clipfrac", 0.0),
        "policy/approxkl_avg": mean.get("approxkl", 0.0),
        "loss/policy_avg": mean.get("pg_loss", 0.0),
        "loss/value_avg": mean.get("vf_loss", 0.0),
        "loss/kl_avg": mean.get("kl_loss", 0.0),
        "val/clipfrac_avg": mean.get("vf_clipfrac", 0.0),
        "val/ratio": mean.get("ratio", 1.0),
    }


# ---------------------------------------------------------------- 2f. logging, checkpoints


def iteration_metrics(batch: Rollout, shaped: Shaped, cfg: Config) -> dict[str, float]:
    """The rollout side of a metrics row (TRL's names), measured before the update."""
    mask = batch.response_mask
    kls = kl_by_estimator(batch.logprobs, batch.ref_logprobs, mask)
    kl = kls[cfg.kl_estimator]
    non_score = -shaped.kl_coef * kl
    return {
        "objective/scores": float(batch.scores.mean()),
        "objective/kl": kl,
        **{f"objective/kl_{name}": value for name, value in kls.items()},
        "objective/entropy": float(batch.entropy.sum(dim=1).mean()),
        "objective/non_score_reward": non_score,
        "objective/rlhf_reward": float(shaped.scores.mean()) + non_score,
        "val/num_eos_tokens": int(batch.has_eos.sum()),
        "kl_coef": shaped.kl_coef,
        "completions/mean_length": float(batch.lengths.float().mean()),
        "completions/repeated_ngram_rate": repeated_ngram_rate(list(batch.completions)),
    }


def write_samples(run: Run, step: int, batch: Rollout, shaped: Shaped) -> None:
    """Append this iteration's completions, scores and KL to samples.jsonl."""
    if not run.is_main:
        return
    from rlhfkit.data.chat import prompt_text

    kl = shaped.kl.sum(dim=1)
    with open(run.output / "samples.jsonl", "a") as f:
        for i in range(batch.num_samples):
            f.write(json.dumps({"step": step, "prompt": prompt_text(batch.prompts[i]),
                                "completion": batch.completions[i], "score": float(batch.scores[i]),
                                "shaped_score": float(shaped.scores[i]), "kl": float(kl[i]),
                                "length": int(batch.lengths[i]), "has_eos": bool(batch.has_eos[i])}) + "\n")


def truncate_samples(run: Run, step: int) -> None:
    """On resume, drop the sample rows written after the checkpoint."""
    path = run.output / "samples.jsonl"
    if run.is_main and path.exists():
        rows = [line for line in path.read_text().splitlines() if line.strip()]
        path.write_text("".join(r + "\n" for r in rows if json.loads(r)["step"] <= step))


def save_policy_snapshot(run: Run, model, tokenizer, step: int) -> None:
    """policy-N/: the policy at iteration N, loadable by ``rlhfkit.models.loading.load_causal_lm``
    (a full model, or a LoRA adapter folder over the base). Written atomically."""
    tmp_name, final = f".tmp-policy-{step}", run.output / f"policy-{step}"
    save_final_model(run, run.accelerator.unwrap_model(model).policy, tokenizer, merge_lora=False, subdir=tmp_name)
    if run.is_main:
        if final.exists():
            shutil.rmtree(final)
        os.replace(run.output / tmp_name, final)
    run.accelerator.wait_for_everyone()


def save(run: Run, model, tokenizer, step: int, cfg: Config, kl_ctl) -> None:
    if not cfg.save_only_model:  # with it, policy-N/ is the model-only checkpoint
        save_checkpoint(run, step, {"kl_coef": kl_ctl.value}, cfg.save_total_limit)
    save_policy_snapshot(run, model, tokenizer, step)


# ---------------------------------------------------------------- the recipe


@dataclass
class PPOResult(TrainResult):
    """``snapshots``: (iteration, policy-N/ folder) of every saved policy, in order, the final one last
    (with --save-only-model the final policy is only ``final_model``)."""

    snapshots: list[tuple[int, Path]] = field(default_factory=list)


def iterate(run: Run, cfg: Config, training: Training, prompts: list, tokenizer, reference, reward_fn, kl_ctl,
            ptx: PtxData | None, sampler: DecodingCopy, iteration: int) -> dict[str, float]:
    """One iteration, steps 2a-2f of the module docstring; returns its metrics row."""
    acc = run.accelerator
    t0 = time.time()
    seed_everything(iteration_seed(cfg.seed, iteration), acc.process_index)
    batch_prompts = [prompts[i] for i in training.plan.local_microbatches(iteration, acc.process_index)[0]]

    # 2a. rollout (no grad): samples, policy and reference log-probs, values
    timings: dict[str, float] = {}
    with run.autocast():  # --bf16: as the update's forward (training.optimizer_step)
        batch = rollout(training.model, reference, tokenizer, batch_prompts, sampling_params(cfg),
                        max_prompt_length=cfg.max_length - cfg.max_new_tokens,
                        batch_size=cfg.generation_batch_size * cfg.samples_per_prompt, sampler=sampler.current(),
                        timings=timings)
    # 2b. score
    t1 = time.time()
    scores, parts = score_parts(reward_fn, list(batch.prompts), list(batch.completions))
    batch = score(batch, lambda _prompts, _completions: scores)
    t2 = time.time()
    # 2c-d. rewards and advantages
    shaped = shape_rewards(batch, cfg, kl_ctl.value)
    advantages, returns = compute_advantages(batch, shaped, cfg)
    # 2e. update
    stats = update(run, training.model, training.optimizer, training.scheduler, batch, advantages, returns, cfg,
                   kl_ctl.value, iteration, ptx)
    t3 = time.time()
    # 2f. the row, the KL controller, samples (run_steps logs the row and checkpoints)
    row = {"step": iteration + 1, "epoch": training.plan.epoch_at(iteration + 1),
           **iteration_metrics(batch, shaped, cfg), **stats,
           **{f"objective/scores/{name}": sum(values) / len(values) for name, values in parts.items()},
           "time/generation": t1 - t0, "time/rollout_forward": timings["forward"],
           "time/scoring": t2 - t1, "time/update": t3 - t2,
           "tokens_per_second": float(batch.lengths.sum()) / (t3 - t0),
           "elapsed_s": time.time() - run.started}
    kl_ctl.update(row["objective/kl"], batch.num_samples)
    if cfg.sample_every and (iteration + 1) % cfg.sample_every == 0:
        write_samples(run, iteration + 1, batch, shaped)
    return row


def train(cfg: Config, run: Run) -> PPOResult:
    from rlhfkit.evaluation.frontier import run_policies
    from rlhfkit.rl.ptx import load_ptx_data
    from rlhfkit.rl.rewards import build_reward

    # 1. setup
    reward_fn = build_reward(cfg.reward, cfg.reward_weight, cfg.reward_gate, cfg.dtype, run.accelerator.device)
    tokenizer, model, reference = build_models(cfg, run.accelerator.device)
    prompts = load_prompt_data(cfg, tokenizer, run)
    ptx = load_ptx_data(cfg.ptx_data, tokenizer, cfg, run, cfg.ptx_batch_size or cfg.minibatch_size or cfg.rollout_size,
                        cfg.ptx_coef) if cfg.ptx_data else None
    updates_per_iteration = cfg.ppo_epochs * (cfg.rollout_size // (cfg.minibatch_size or cfg.rollout_size))
    value_lr = {"value_head.": cfg.value_lr, "critic.": cfg.value_lr} if cfg.value_lr else None
    kl_ctl = make_kl_controller(cfg)
    # one "micro-batch" of --batch-size prompts per iteration: PPO's --grad-accum splits its minibatches
    training = setup_training(run, cfg, model, len(prompts), grad_accum=1, updates_per_step=updates_per_iteration,
                              lr_by_prefix=value_lr, checkpointed=(kl_ctl,))
    truncate_samples(run, training.start)
    sampler = DecodingCopy(run.accelerator.unwrap_model(training.model).policy, cfg.sample_dtype)

    # 2. the iterations; 3. the final policy
    logged = run_steps(run, cfg, training,
                       partial(iterate, run, cfg, training, prompts, tokenizer, reference, reward_fn, kl_ctl, ptx,
                               sampler),
                       desc=cfg.algo, postfix={"score": "objective/scores", "kl": "objective/kl"},
                       save=lambda step: save(run, training.model, tokenizer, step, cfg, kl_ctl))
    final = save_final_model(run, run.accelerator.unwrap_model(training.model).policy, tokenizer, cfg.merge_lora)
    return PPOResult.of(run, logged, final, snapshots=[(step, Path(p)) for step, p in run_policies(run.output)])


def main(cfg: Config) -> int:
    with start_run(validated(cfg)) as run:
        row = train(cfg, run).metrics
    if row:
        run.print(f"{cfg.algo} done: score {row['objective/scores']:.4f}, KL {row['objective/kl']:.4f} "
                  f"after {row['step']} iterations; policy saved to {run.output}")
    return 0
