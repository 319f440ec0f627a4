"""Online DPO (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback"; TRL's
OnlineDPOTrainer): ``rlhfkit dpo --online``.

    1. setup: the prompts (ppo's length policy), the preference source (--reward, any source
       ``rlhfkit ppo`` takes, or a pairwise judge through the model backends), the policy and
       the frozen reference (ppo's build_models: a copy of the initial policy, the base model
       with the LoRA adapters disabled, or --ref-model); optimizer, schedule; --resume
    2. for each step (--batch-size × --grad-accum prompts per process, sampling seeded by
       (--seed, step) as ppo's iterations are):
       a. sample two completions per prompt from the *current* policy (rl.rollout.rollout, the
          one sampling path), with their policy and reference log-probs (no grad)
       b. prefer: the reward scores both and the higher one is chosen (a tie keeps the first
          sample, as TRL does; several rewards: their combination, rl.rewards.build_reward); or
          the judge compares them in both orders (the verdicts of ``ai-label``), and a tie, an
          inconsistent or an unreadable verdict leaves the pair out of the loss (weight 0)
       c. update: one optimizer step of the DPO loss (--loss, losses.DPO_LOSSES) on
          [chosen, rejected] per prompt: the policy's log-probs with gradients, the reference's
          from 2a; micro-batches of --batch-size pairs
       d. the metrics row (TRL's names); checkpoints every --save-steps (training.run_steps)
    3. save the final policy

Log-probs are those of the temperature-scaled policy (at --temperature 1, the policy itself), in
the loss, the implicit rewards and the KL alike, as in ``rlhfkit ppo``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from rlhfkit.generation.decoding import DecodingCopy, SamplingParams
from rlhfkit.recipes.dpo import METRIC_KEYS, Config, load_reference_model, pair_stats, preference_losses
from rlhfkit.recipes.ppo import build_models, iteration_seed, load_prompt_data
from rlhfkit.rl.metrics import repeated_ngram_rate, sequence_kl
from rlhfkit.rl.rollout import Rollout, forward_response, rollout, score
from rlhfkit.training import (
    Run,
    Training,
    TrainResult,
    optimizer_step,
    run_steps,
    save_final_model,
    save_model_checkpoint,
    seed_everything,
    setup_training,
    step_row,
)


@dataclass(frozen=True)
class Preference:
    """Which sample of each pair is chosen. Pairs are rows (2i, 2i+1) of the rollout."""

    first_wins: Tensor           # [B] bool: row 2i is chosen
    weights: Tensor              # [B] float: 1 for a pair in the loss, 0 for one left out
    stats: dict[str, float]      # the source's own metrics (judge rates, each reward's mean score)

    def rows(self) -> Tensor:
        """``[B, 2]`` rollout rows: [chosen, rejected] per pair."""
        first = torch.arange(len(self.first_wins)) * 2
        wins = self.first_wins.long()
        return torch.stack([first + 1 - wins, first + wins], dim=1)


def prefer_by_scores(scores: Tensor) -> Preference:
    """The higher score is chosen; a tie keeps the first sample (TRL: ``first >= second``)."""
    first, second = scores.view(-1, 2).unbind(1)
    return Preference(first >= second, torch.ones_like(first), {})


# ---------------------------------------------------------------- the pairwise judge


def judge_chats(prompts: list, completions: list) -> list[list]:
    """Two chats per pair (rows 2i, 2i+1): the first sample shown as A, then as B."""
    from rlhfkit.data.chat import prompt_text
    from rlhfkit.evaluation.judging.prompts import pairwise_messages

    chats = []
    for i in range(0, len(completions), 2):
        question, a, b = prompt_text(prompts[i]), completions[i], completions[i + 1]
        chats += [pairwise_messages([question], [a], [b]), pairwise_messages([question], [b], [a])]
    return chats


def prefer_by_judge(backend, prompts: list, completions: list, max_tokens: int) -> Preference:
    """Each pair judged in both orders (greedy); the verdicts combined as ``ai-label`` combines them.
    Pairs without a consistent winner (tie, position-inconsistent, unreadable) get weight 0."""
    from rlhfkit.evaluation.judging.pairwise import combine_verdicts
    from rlhfkit.label.verdicts import read_verdict
    from rlhfkit.models.backends import replies

    verdicts = [read_verdict(r) for r in replies(backend, judge_chats(prompts, completions), 0.0, max_tokens)]
    outcomes = [combine_verdicts(verdicts[i].letter, verdicts[i + 1].letter).outcome
                for i in range(0, len(verdicts), 2)]
    n = len(outcomes)
    stats = {"judge/decided": sum(o in ("win", "loss") for o in outcomes) / n,
             "judge/ties": outcomes.count("tie") / n, "judge/invalid": outcomes.count("invalid") / n}
    return Preference(torch.tensor([o != "loss" for o in outcomes]),
                      torch.tensor([float(o in ("win", "loss")) for o in outcomes]), stats)


def preference_source(cfg: Config, run: Run) -> tuple[Callable[[Rollout], tuple[Rollout, Preference]], Callable]:
    """``prefer(batch) -> (batch with scores or not, Preference)`` and a function that closes it."""
    if cfg.reward:
        from rlhfkit.rl.rewards import build_reward, score_parts

        reward_fn = build_reward(cfg.reward, cfg.reward_weight, cfg.reward_gate, cfg.dtype, run.accelerator.device)

        def by_reward(batch: Rollout) -> tuple[Rollout, Preference]:
            scores, parts = score_parts(reward_fn, list(batch.prompts), list(batch.completions))
            batch = score(batch, lambda _prompts, _completions: scores)
            preference = prefer_by_scores(batch.scores)
            means = {f"objective/scores/{name}": sum(values) / len(values) for name, values in parts.items()}
            return batch, Preference(preference.first_wins, preference.weights, means)

        return by_reward, lambda: None
    from rlhfkit.models.backends import make_backend

    backend = make_backend(cfg.judge_model, cfg.judge_url, cfg.judge_model, cfg.judge_api_key_env, role="judge",
                           dtype=cfg.dtype, seed=cfg.seed)

    def by_judge(batch: Rollout) -> tuple[Rollout, Preference]:
        return batch, prefer_by_judge(backend, list(batch.prompts), list(batch.completions), cfg.judge_max_new_tokens)

    return by_judge, getattr(backend, "close", lambda: None)


# ---------------------------------------------------------------- the update


def pairs_loss(model, batch: Rollout, rows: Tensor, weights: Tensor, cfg: Config) -> tuple[Tensor, dict]:
    """Weighted sum of the DPO losses of the pairs ``rows`` ([b, 2] rollout rows, [chosen, rejected])
    and the summed statistics, from one forward of the policy (the reference's log-probs from the rollout)."""
    pairs = batch.select(rows.reshape(-1))
    out = forward_response(model, pairs.prompt_ids, pairs.prompt_mask, pairs.response_ids, pairs.response_mask,
                           cfg.temperature, with_values=False)
    policy = out.logprobs.sum(dim=1).view(-1, 2)  # 0 off the response mask
    ref = None if cfg.loss == "simpo" else pairs.ref_logprobs.sum(dim=1).view(-1, 2).to(policy.device, policy.dtype)
    losses, chosen_rewards, rejected_rewards = preference_losses(cfg, policy, ref,
                                                                     pairs.lengths.view(-1, 2).to(policy.device))
    return (losses * weights.to(losses.device, losses.dtype)).sum(), {
        **pair_stats(policy, chosen_rewards, rejected_rewards), "tokens": pairs.response_mask.sum()}


def update(run: Run, training: Training, batch: Rollout, preference: Preference, cfg: Config) -> dict[str, float]:
    """One optimizer step over the step's pairs in micro-batches of --batch-size; the sums are divided
    by the pairs of the global batch, so the split changes nothing (training.optimizer_step)."""
    rows, weights = preference.rows(), preference.weights
    pieces = [slice(i, i + cfg.batch_size) for i in range(0, len(rows), cfg.batch_size)]
    model = training.model
    model.train(cfg.gradient_checkpointing)  # dropout is off everywhere: training mode only engages checkpointing
    stats = optimizer_step(run, model, training.optimizer, training.scheduler, pieces,
                           lambda piece: pairs_loss(model, batch, rows[piece], weights[piece], cfg),
                           normalizer=training.plan.global_batch, max_grad_norm=cfg.max_grad_norm)
    model.eval()
    return stats


# ---------------------------------------------------------------- one step, the recipe


def step_metrics(batch: Rollout, preference: Preference, beta: float) -> dict[str, float]:
    """The sampling side of a row, TRL's names: KL (k1, summed over each completion's tokens), entropy,
    β·KL as the non-score reward, the scores of both samples and the chosen-minus-rejected margin."""
    kl = float(sequence_kl(batch.logprobs, batch.ref_logprobs, batch.response_mask, "k1").mean())
    row = {"objective/kl": kl, "objective/entropy": float(batch.entropy.sum(dim=1).mean()),
           "objective/non_score_reward": -beta * kl, "val/contain_eos_token": float(batch.has_eos.float().mean()),
           "beta": beta, "completions/mean_length": float(batch.lengths.float().mean()),
           "completions/repeated_ngram_rate": repeated_ngram_rate(list(batch.completions)), **preference.stats}
    if batch.scores is not None:
        chosen, rejected = batch.scores[preference.rows()].unbind(1)
        row.update({"objective/scores": float(batch.scores.mean()),
                    "objective/scores_margin": float((chosen - rejected).mean()),
                    "objective/rlhf_reward": float(batch.scores.mean()) - beta * kl})
    return row


def online_step(run: Run, cfg: Config, training: Training, prompts: list, tokenizer, reference, prefer,
                sampler: DecodingCopy, step: int) -> dict[str, float]:
    """Steps 2a-2d of the module docstring; returns the metrics row."""
    acc = run.accelerator
    t0 = time.time()
    seed_everything(iteration_seed(cfg.seed, step), acc.process_index)
    batch_prompts = [prompts[i] for mb in training.plan.local_microbatches(step, acc.process_index) for i in mb]
    timings: dict[str, float] = {}
    params = SamplingParams(strategy="sample", max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, n=2)
    with run.autocast():  # --bf16: as the update's forward (training.optimizer_step)
        batch = rollout(training.model, reference, tokenizer, batch_prompts, params,
                        max_prompt_length=cfg.max_length - cfg.max_new_tokens, sampler=sampler.current(),
                        timings=timings)
    t1 = time.time()
    batch, preference = prefer(batch)
    t2 = time.time()
    stats = update(run, training, batch, preference, cfg)
    t3 = time.time()
    pairs = training.plan.global_batch
    return {**step_row(run, training.plan, step, stats, training.scheduler, t3 - t0),
            **step_metrics(batch, preference, cfg.beta), **{k: stats[k] / pairs for k in METRIC_KEYS},
            "time/generation": t1 - t0, "time/rollout_forward": timings["forward"], "time/scoring": t2 - t1,
            "time/update": t3 - t2}


def train(cfg: Config, run: Run) -> TrainResult:
    # 1. setup
    prefer, close = preference_source(cfg, run)
    device = run.accelerator.device
    tokenizer, model, reference = build_models(cfg, device)
    if cfg.ref_model:
        reference = load_reference_model(run, cfg)
    prompts = load_prompt_data(cfg, tokenizer, run)
    training = setup_training(run, cfg, model, len(prompts))

    def policy():
        return run.accelerator.unwrap_model(training.model).policy

    def save_policy_only(step: int):  # --save-only-model: checkpoint-N/ holds the policy as the final model does
        return save_model_checkpoint(run, policy(), tokenizer, step, cfg.save_total_limit)

    # 2. the steps; 3. the final policy
    try:
        logged = run_steps(run, cfg, training,
                           partial(online_step, run, cfg, training, prompts, tokenizer, reference, prefer,
                                   DecodingCopy(policy(), cfg.sample_dtype)),
                           desc=f"online dpo ({cfg.loss})",
                           save=save_policy_only if cfg.save_only_model else None,
                           postfix={"loss": "loss", "acc": "rewards/accuracies",
                                    **({"score": "objective/scores"} if cfg.reward else {})})
    finally:
        close()
    return TrainResult.of(run, logged, save_final_model(run, policy(), tokenizer, cfg.merge_lora))
