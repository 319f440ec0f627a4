"""Offline RL from a fixed data set of scored completions: A-LoL and advantage-weighted regression.

    1. read the records: ``{prompt, completion, reward}``, or ``{prompt, chosen, rejected}`` (each
       side one completion); completions without a reward are scored by --reward (a reward-model
       folder, a Python function or an http endpoint: :mod:`rlhfkit.rl.rewards`)
    2. tokenise each example as one prompt and one completion (the --max-length policy)
    3. the frozen reference π_ref (--ref-model, else the initial policy; with LoRA the base model,
       adapters off) read once over the data, each distinct prompt with all its completions, and
       cached in --output (:mod:`rlhfkit.models.reference`): log π_ref of every completion token,
       and the hidden state of the last prompt token (:func:`rlhfkit.rl.value.prompt_features`)
    4. the reference's value V_ref(x): a ridge-regression head on those features trained on the
       rewards by mean squared error, cross-fitted over the prompts (each example's value comes
       from a head that never saw its prompt; :func:`rlhfkit.rl.value.fit_prompt_values`);
       the advantage A = r − V_ref(x)
    5. for each optimizer step (training.fit): the step's examples -> one padding-free forward
       (:func:`rlhfkit.models.packed.completion_logps`) -> :func:`rlhfkit.losses.offline_loss`
       -> AdamW. ``alol``/``alol-seq`` train on the examples with A > 0 only (the data order
       runs over them), ``awr`` on all; log offline/*, value/* and logps/*; checkpoint
    6. evaluate on --eval-data (its values from the head fitted on every training prompt); save

Nothing is sampled: the data's completions are the only actions the policy learns from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from rlhfkit.config import TrainConfig, arg, flag, validated
from rlhfkit.data.chat import encode
from rlhfkit.data.length import apply_length_policy
from rlhfkit.data.schema import ScoredExample, load_scored
from rlhfkit.errors import InputError
from rlhfkit.losses import OFFLINE_LOSSES, offline_loss
from rlhfkit.models import reference as ref_cache
from rlhfkit.models.packed import Group, completion_logps, supports_packing
from rlhfkit.recipes.dpo import disable_dropout
from rlhfkit.recipes.sft import build_model
from rlhfkit.rl.rewards import check_reward_spec
from rlhfkit.rl.value import PromptValues, fit_prompt_values, prompt_features
from rlhfkit.training import Run, TrainResult, evaluate_means, fit, save_final_model, setup_training, start_run

Algo = Literal["alol", "alol-seq", "awr"]
STEP_KEYS = ("logps/policy", "logps/ref", "offline/log_ratio", "offline/reward_mean", "offline/advantage_mean",
             "offline/clipfrac")
REWARD_CHUNK = 256  # completions per call of a reward function


@dataclass
class Config(TrainConfig):
    """Offline RL (A-LoL, AWR) from a fixed data set of scored completions; nothing is sampled."""

    algo: Algo = arg("alol", "alol: A-LoL, the advantage of the frozen reference times the sequence importance "
                     "weight pi/pi_ref clipped to [1-eps, 1+eps], on the examples with a positive advantage only; "
                     "alol-seq: the same with one clipped weight per token (the paper's A-LoL seq.); awr: "
                     "advantage-weighted regression, every example weighted by min(exp(A/beta), max weight). "
                     "See rlhfkit.losses.OFFLINE_LOSSES.")
    reward: str = arg("", "Scores the completions whose record has no `reward` (both sides of a preference record): "
                      "a reward-model folder, file.py:function, module:function or an http(s) URL.")
    ref_model: str = arg("", "Reference model (path, hub id, embedded name) whose value and log-probs are used; "
                         "default: the initial policy (with LoRA: the base model with the adapters disabled).")
    clip: float = arg(0.9, "A-LoL's importance-weight clip: pi/pi_ref is clamped to [1-eps, 1+eps] (the authors' "
                      "default 0.9); --algo alol and alol-seq.")
    awr_beta: float = arg(0.5, "AWR's temperature beta in exp(A / beta) (--algo awr).")
    awr_max_weight: float = arg(20.0, "AWR's weight clip (--algo awr).")
    value_folds: int = arg(5, "Folds of prompts for cross-fitting the value head: each example's value comes from "
                           "the head fitted on the other folds, whose mean squared error is logged as value/mse.")
    lr: float = arg(2e-5, "Peak learning rate (AdamW).")
    ref_batch_size: int = arg(16, "Prompts per forward of the reference pass (each with all its completions).")
    eval_batch_size: int = arg(16, "Examples per evaluation forward.")
    packed: bool = arg(True, "Padding-free forward with each prompt encoded once (Llama-family models; others "
                       "fall back to padded rows automatically).")

    def validate(self) -> list[str]:
        problems = super().validate()
        if not 0 < self.clip < 1 or not math.isfinite(self.clip):
            problems.append(f"--clip must be in (0, 1) (got {self.clip})")
        if self.awr_beta <= 0:
            problems.append(f"--awr-beta must be > 0 (got {self.awr_beta})")
        if self.awr_max_weight <= 0:
            problems.append(f"--awr-max-weight must be > 0 (got {self.awr_max_weight})")
        for name in ("value_folds",):
            if getattr(self, name) < 2:
                problems.append(f"--{flag(name)} must be >= 2 (got {getattr(self, name)})")
        for name in ("ref_batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                problems.append(f"--{flag(name)} must be >= 1 (got {getattr(self, name)})")
        if self.reward:
            problems += check_reward_spec(self.reward)
        return problems


# ---------------------------------------------------------------- data


@dataclass
class Split:
    """One data split as the recipe reads it; example i is ``groups[i]`` with ``rewards[i]``.

    The reference pass fills ``ref_tokens`` and ``features``; the value head ``advantages``.
    """

    groups: list[Group]          # one prompt and one completion per example
    rewards: torch.Tensor        # [N] float64
    prompts: list[Group]         # the distinct prompts, each with the completions of all its examples
    prompt_of: list[int]         # example i's prompt in ``prompts``
    slot_of: list[int]           # example i's completion among ``prompts[prompt_of[i]].completions``
    ref_tokens: list[torch.Tensor] | None = None  # log π_ref of each completion token (float64)
    features: torch.Tensor | None = None          # [P, d] the reference's last prompt-token hidden state
    advantages: torch.Tensor | None = None        # [N] A = r − V_ref(x), float64

    def __len__(self) -> int:
        return len(self.groups)


def rewards_of(examples: list[ScoredExample], spec: str, device=None) -> list[float]:
    """The records' rewards, the missing ones scored by the reward ``spec`` (``--reward``)."""
    missing = [i for i, ex in enumerate(examples) if ex.reward is None]
    if missing and not spec:
        raise InputError([examples[i].source.problem("reward", "missing field (or pass --reward to score the "
                                                               "completions)") for i in missing])
    rewards = [ex.reward for ex in examples]
    if not missing:
        return rewards
    from rlhfkit.rl.rewards import load_reward

    source, problems = load_reward(spec, device=device), []
    for start in range(0, len(missing), REWARD_CHUNK):
        chunk = missing[start:start + REWARD_CHUNK]
        for i, score in zip(chunk, source([examples[i].prompt for i in chunk],
                                          [examples[i].completion for i in chunk])):
            rewards[i] = score
            if not math.isfinite(score):
                problems.append(examples[i].source.problem(None, f"--reward {spec} gave the score {score}"))
    if problems:
        raise InputError(problems)
    return rewards


def encode_example(tokenizer, ex: ScoredExample, max_length: int, truncation: str = "truncate"
                   ) -> tuple[Group | None, bool]:
    """One prompt and its completion as a group of one, and whether it was over ``max_length``
    (None under ``drop``). Raises ValueError when the completion keeps no trained token."""
    enc = encode(tokenizer, ex.prompt, ex.completion, max_length, truncation)
    if enc is None:
        return None, True
    p = enc.prompt_length
    if p == 0:
        raise ValueError("the prompt has no token")
    if not any(enc.trained[p:]):
        raise ValueError("the completion has no trained token" +
                         (f" after truncation to --max-length {max_length}" if enc.truncated else ""))
    return Group(enc.input_ids[:p], [enc.input_ids[p:]], [enc.trained[p:]]), enc.truncated


def by_prompt(groups: list[Group]) -> tuple[list[Group], list[int], list[int]]:
    """Examples sharing a prompt gathered into one group: (prompts, prompt_of, slot_of)."""
    members: dict[tuple[int, ...], list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(tuple(g.prompt), []).append(i)
    prompts, prompt_of, slot_of = [], [0] * len(groups), [0] * len(groups)
    for p, indices in enumerate(members.values()):
        prompts.append(Group(groups[indices[0]].prompt, [groups[i].completions[0] for i in indices],
                             [groups[i].scored[0] for i in indices]))
        for k, i in enumerate(indices):
            prompt_of[i], slot_of[i] = p, k
    return prompts, prompt_of, slot_of


def read_split(tokenizer, path: str, cfg: Config, run: Run) -> Split:
    """The scored completions of ``path``, tokenised under the length policy
    (:mod:`rlhfkit.data.length`), then the kept ones without a reward scored by --reward;
    problems name file, record and field."""

    def encode_one(ex: ScoredExample) -> tuple[tuple[Group, ScoredExample] | None, bool]:
        group, over = encode_example(tokenizer, ex, cfg.max_length, cfg.truncation)
        return (None if group is None else (group, ex)), over

    kept = apply_length_policy(load_scored(path, config=cfg.data_config, seed=cfg.seed), encode_one, source=path,
                               max_length=cfg.max_length, truncation=cfg.truncation, say=run.print)
    rewards = rewards_of([ex for _, ex in kept], cfg.reward, run.accelerator.device)
    groups = [group for group, _ in kept]
    prompts, prompt_of, slot_of = by_prompt(groups)
    return Split(groups, torch.tensor(rewards, dtype=torch.float64), prompts, prompt_of, slot_of)


# ---------------------------------------------------------------- the reference and its value


def reference_pass(run: Run, cfg: Config, model, splits: dict[str, Split], packed: bool, pad_id: int,
                   adapters_off: bool = False) -> None:
    """Fill every split's ``ref_tokens`` and ``features`` from one pass of the reference ``model``
    over its distinct prompts (cached as offline-ref-<key>.pt in --output)."""

    def score(prompts: list[Group]) -> list:
        scored = completion_logps(model, prompts, packed, pad_id)
        tokens = [t.clone() for t in scored.token_logps.double().cpu().split(scored.lengths.tolist())]
        features = prompt_features(model, [g.prompt for g in prompts])
        rows, k = [], 0
        for g, feature in zip(prompts, features):
            rows.append((feature.clone(), tokens[k:k + len(g.completions)]))
            k += len(g.completions)
        return rows

    identity = {"ref": ref_cache.model_fingerprint(cfg.ref_model or cfg.model), "dtype": cfg.dtype,
                "adapters_off": adapters_off, "features": "last prompt token, final hidden state"}
    prompts = {name: split.prompts for name, split in splits.items()}
    table = ref_cache.precompute_reference(
        run, model, prompts, score, name="offline-ref", key=ref_cache.reference_key(identity, prompts),
        batch_size=cfg.ref_batch_size, adapters_off=adapters_off, desc="reference pass", unit="prompts",
        show_progress=cfg.progress)
    for name, split in splits.items():
        rows = table[name]
        split.features = torch.stack([feature for feature, _ in rows])
        split.ref_tokens = [rows[p][1][k] for p, k in zip(split.prompt_of, split.slot_of)]


def run_reference(run: Run, cfg: Config, policy, splits: dict[str, Split], packed: bool, pad_id: int) -> None:
    """Step 3 with the right model: --ref-model (loaded for the pass, then freed), else the initial
    policy (with LoRA: its adapters disabled)."""
    if not cfg.ref_model:
        reference_pass(run, cfg, policy, splits, packed, pad_id, adapters_off=bool(cfg.lora_r))
        return
    from rlhfkit.models.loading import load_causal_lm

    ref_model = load_causal_lm(cfg.ref_model, cfg.dtype, run.accelerator.device, cfg.quantization_bits).eval()
    ref_model.requires_grad_(False)
    disable_dropout(ref_model)
    reference_pass(run, cfg, ref_model, splits, packed and supports_packing(ref_model), pad_id)


def fit_values(run: Run, cfg: Config, train: Split, held_out: Split | None) -> PromptValues:
    """Step 4: V_ref on the training split (cross-fitted), the advantages of both splits."""
    values = fit_prompt_values(train.features, train.prompt_of, train.rewards, cfg.value_folds, cfg.seed)
    train.advantages = train.rewards - values.values
    if held_out is not None:
        held_out.advantages = held_out.rewards - values.predict(held_out.features)[held_out.prompt_of]
    positive = int((train.advantages > 0).sum())
    run.print(f"value head: ridge {values.ridge:g}, held-out mse {values.mse:.4f} (variance explained "
              f"{values.var_explained:.3f}); advantage > 0 for {positive} of {len(train)} examples")
    return values


# ---------------------------------------------------------------- loss


def batch_loss(model, split: Split, indices: list[int], cfg: Config, packed: bool, pad_id: int):
    """Sum of the examples' losses (one forward) and the summed statistics."""
    scored = completion_logps(model, [split.groups[i] for i in indices], packed, pad_id)
    logps, mask = scored.per_token()
    ref_rows = [split.ref_tokens[i] for i in indices]
    if [len(r) for r in ref_rows] != scored.lengths.tolist():
        raise RuntimeError("the reference's token log-probs do not match the completions (stale cache?)")
    ref = torch.nn.utils.rnn.pad_sequence(ref_rows, batch_first=True).to(logps.device, logps.dtype)
    advantages = split.advantages[indices]
    losses, stats = offline_loss(logps, ref, mask, advantages.to(logps.device), algo=cfg.algo, clip=cfg.clip,
                                 beta=cfg.awr_beta, max_weight=cfg.awr_max_weight)
    policy = scored.logps.detach().double().cpu()
    ref_sums = torch.stack([r.sum() for r in ref_rows])
    weight = OFFLINE_LOSSES[cfg.algo].weight_stat
    return losses.sum(), {
        "logps/policy": policy.sum(), "logps/ref": ref_sums.sum(), "offline/log_ratio": (policy - ref_sums).sum(),
        "offline/reward_mean": split.rewards[indices].sum(), "offline/advantage_mean": advantages.sum(),
        f"offline/{weight}_mean": stats[weight].sum(), "offline/clipfrac": stats["clipfrac"].sum(),
        "tokens": scored.tokens}


# ---------------------------------------------------------------- recipe


def train(cfg: Config, run: Run) -> TrainResult:
    from rlhfkit.models.loading import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    pad_id = tokenizer.pad_token_id
    data = read_split(tokenizer, cfg.data, cfg, run)
    held_out = read_split(tokenizer, cfg.eval_data, cfg, run) if cfg.eval_data else None

    model = build_model(cfg, run.accelerator.device)
    disable_dropout(model)
    packed = cfg.packed and supports_packing(model)
    if cfg.packed and not packed:
        run.print(f"note: {type(model).__name__} has no packed path; using padded rows")
    run_reference(run, cfg, model, {"train": data, **({"eval": held_out} if held_out else {})}, packed, pad_id)
    values = fit_values(run, cfg, data, held_out)
    constants = {"offline/kept_fraction": float((data.advantages > 0).double().mean()), "value/mse": values.mse,
                 "value/var_explained": values.var_explained}

    loss_spec = OFFLINE_LOSSES[cfg.algo]
    examples = [i for i in range(len(data)) if data.advantages[i] > 0 or not loss_spec.positive_only]
    if not examples:
        run.print("no example has a positive advantage (A = r - V_ref(x) <= 0 everywhere): nothing to train; "
                  "the model is saved unchanged")
        rows = [run.metrics.log({"step": 0, "loss": 0.0, **constants})]
        return TrainResult.of(run, rows, save_final_model(run, model, tokenizer, cfg.merge_lora))

    training = setup_training(run, cfg, model, len(examples))
    model = training.model

    def loss_fn(indices: list[int]):
        return batch_loss(model, data, [examples[i] for i in indices], cfg, packed, pad_id)

    def evaluate() -> dict[str, float]:
        metrics = evaluate_means(model, len(held_out), cfg.eval_batch_size,
                                 lambda indices: batch_loss(model, held_out, indices, cfg, packed, pad_id))
        return {**metrics, "eval/offline/kept_fraction": float((held_out.advantages > 0).double().mean())}

    logged = fit(run, cfg, training, loss_fn, desc=f"offline-rl ({cfg.algo})",
                 per_example=(*STEP_KEYS, f"offline/{loss_spec.weight_stat}_mean"),
                 postfix={"A": "offline/advantage_mean"}, evaluate=evaluate if held_out is not None else None,
                 constants=constants)
    return TrainResult.of(run, logged, save_final_model(run, model, tokenizer, cfg.merge_lora))


def main(cfg: Config) -> int:
    """Train; also callable from Python: ``main(Config(data=..., output=...))``."""
    with start_run(validated(cfg)) as run:
        metrics = train(cfg, run).metrics
    run.print(f"offline-rl ({cfg.algo}) done: loss {metrics['loss']:.4f}, kept {metrics['offline/kept_fraction']:.2f} "
              f"of the examples (A > 0), value mse {metrics['value/mse']:.4f}" +
              (f"; eval loss {metrics['eval/loss']:.4f}" if "eval/loss" in metrics else "") +
              f"; model saved to {run.output}")
    return 0
