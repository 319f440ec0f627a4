"""Direct preference optimisation and its relatives (IPO, SLiC hinge, robust DPO, SimPO, ...).

    1. read the pairs (rankings expanded into all their pairs); tokenise each pair as one prompt
       and two completions (chosen, rejected) sharing it
    2. reference log-probs log π_ref(y|x): computed once before training and cached in --output
       under a hash of the tokenised data and the reference model (default), or on the fly each
       step (--no-precompute-ref). The reference is --ref-model, else the initial policy (with
       LoRA: the base model, adapters disabled). SimPO needs none.
    3. for each optimizer step: the step's pairs -> one padding-free forward for all chosen and
       rejected completions (prompt encoded once per pair, logits only on completion tokens;
       see rlhfkit.models.packed) -> losses.dpo_loss -> AdamW step; log rewards/* and logps/*;
       checkpoint (training.fit)
    4. evaluate on --eval-data; save the final model

The `margin` field of a pair (how much better chosen is) enters the losses that act on the
log-ratio margin Δ (sigmoid, robust, hinge) as an offset, as the Llama 2 reward-model margin
and ODPO do: −log σ(βΔ − margin), max(0, 1 + margin − βΔ). Other losses ignore it (a note says
so). --no-use-margin ignores it everywhere.

``--online`` (online DPO, Guo et al. 2024) samples the pairs from the current policy every step
instead of reading them: see :mod:`rlhfkit.recipes.online_dpo`.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal

import torch

from rlhfkit.config import (
    PROMPTS_HELP,
    REWARD_GATE_HELP,
    REWARD_HELP,
    REWARD_WEIGHT_HELP,
    TrainConfig,
    arg,
    validated,
)
from rlhfkit.data.chat import encode
from rlhfkit.data.length import apply_length_policy
from rlhfkit.data.schema import PreferenceExample, load_preferences
from rlhfkit.generation.decoding import SAMPLE_DTYPE_HELP, DecodingDtype
from rlhfkit.losses import dpo_loss
from rlhfkit.models import reference as ref_cache
from rlhfkit.models.backends import JudgeOptions
from rlhfkit.models.packed import Group, Scored, completion_logps, supports_packing
from rlhfkit.models.reference import adapters_disabled, model_fingerprint
from rlhfkit.recipes.sft import build_model
from rlhfkit.training import Run, TrainResult, evaluate_means, fit, save_final_model, setup_training, start_run

LossName = Literal["sigmoid", "robust", "hinge", "ipo", "simpo", "apo_zero", "bco_pair"]
MARGIN_LOSSES = {"sigmoid", "robust", "hinge"}        # act on βΔ: the margin is an offset there
SMOOTHING_LOSSES = {"sigmoid", "robust"}
REFERENCE_FREE = {"simpo"}
METRIC_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
               "logps/chosen", "logps/rejected")


OFFLINE_LR = 1e-6
ONLINE_LR = 1e-5  # 40 steps of 8 pairs move SmolLM2-135M on a reward it was not tuned on (docs/dpo.md)


@dataclass
class Config(TrainConfig, JudgeOptions):
    """Direct preference optimisation on prompt/chosen/rejected pairs (and rankings), or online on
    pairs sampled from the policy (--online)."""

    lr: float = arg(0.0, f"Peak learning rate (AdamW); 0: {OFFLINE_LR:g} (DPO wants small ones for full "
                    f"fine-tuning), {ONLINE_LR:g} with --online (a few dozen steps, on-policy pairs).")
    loss: LossName = arg("sigmoid", "Loss (rlhfkit.losses.DPO_LOSSES): sigmoid (DPO), robust (rDPO, with "
                         "--label-smoothing), hinge (SLiC), ipo (IPO on length-averaged log-ratios), simpo "
                         "(reference-free, length-normalised), apo_zero, bco_pair.")
    beta: float = arg(0.1, "β: the strength of the KL regularisation toward the reference (IPO: its τ).")
    label_smoothing: float = arg(0.0, "Assumed rate of flipped labels ε (sigmoid: conservative DPO; robust: "
                                 "rDPO), in [0, 0.5).")
    simpo_gamma: float = arg(0.5, "SimPO's target reward margin γ (--loss simpo only).")
    ref_model: str = arg("", "Reference model (path, hub id, embedded name); default: the initial policy "
                         "(with LoRA: the base model with the adapters disabled).")
    precompute_ref: bool = arg(True, "Compute the reference log-probs once before training and cache them in "
                               "--output (reused by --resume); --no-precompute-ref runs the reference every step.")
    ref_batch_size: int = arg(16, "Pairs per forward when precomputing reference log-probs.")
    use_margin: bool = arg(True, "Use the records' `margin` field as an offset inside the sigmoid/robust/hinge "
                           "losses: -log sigmoid(beta*delta - margin).")
    packed: bool = arg(True, "Padding-free forward with each prompt encoded once per pair (Llama-family "
                       "models; others fall back to padded rows automatically).")
    eval_batch_size: int = arg(16, "Pairs per evaluation forward.")
    online: bool = arg(False, "Online DPO: every step samples two completions per --prompts prompt from the current "
                       "policy and --reward or the judge (--judge-model/--judge-url) picks the chosen one.")
    prompts: str = arg("", PROMPTS_HELP + " --online only.")
    reward: list[str] = arg(default_factory=list, help="--online: the reward that picks the chosen completion "
                            "(higher wins; a tie keeps the first sample), as `rlhfkit ppo --reward` takes it. "
                            + REWARD_HELP)
    reward_weight: list[float] = arg(default_factory=list, help="--online: " + REWARD_WEIGHT_HELP)
    reward_gate: str = arg("", "--online: " + REWARD_GATE_HELP)
    judge_model: str = arg("", "--online: a pairwise judge instead of --reward: the model name sent to "
                           "--judge-url, or (without it) a local path, hub id or embedded name.")
    judge_max_new_tokens: int = arg(512, "--online with a judge: maximum tokens of each judgment.")
    max_new_tokens: int = arg(32, "--online: most tokens sampled per completion.")
    temperature: float = arg(1.0, "--online: sampling temperature; the log-probs in the loss, the KL and the "
                             "implicit rewards are those of the temperature-scaled policy (as in ppo).")
    sample_dtype: DecodingDtype = arg("float32", "--online: " + SAMPLE_DTYPE_HELP)

    def __post_init__(self):
        if self.lr == 0:
            self.lr = ONLINE_LR if self.online else OFFLINE_LR

    @property
    def input_field(self) -> str:
        """The required input: --prompts online, --data offline."""
        return "prompts" if self.online else "data"

    def validate(self) -> list[str]:
        problems = super().validate() + (self.online_problems() if self.online else self.offline_problems())
        if self.beta <= 0:
            problems.append(f"--beta must be > 0 (got {self.beta})")
        if not 0 <= self.label_smoothing < 0.5:
            problems.append(f"--label-smoothing must be in [0, 0.5) (got {self.label_smoothing})")
        elif self.label_smoothing and self.loss not in SMOOTHING_LOSSES:
            problems.append(f"--label-smoothing is used only by --loss {' or '.join(sorted(SMOOTHING_LOSSES))}, "
                            f"not {self.loss}")
        if self.ref_model and self.loss in REFERENCE_FREE:
            problems.append(f"--ref-model: --loss {self.loss} is reference-free")
        if self.ref_batch_size < 1 or self.eval_batch_size < 1:
            problems.append("--ref-batch-size and --eval-batch-size must be >= 1")
        return problems

    def online_problems(self) -> list[str]:
        from rlhfkit.rl.rewards import check_reward_combination

        problems = [f"--{name} is for offline dpo (--online samples its pairs from --prompts)"
                    for name in ("data", "eval-data") if getattr(self, name.replace("-", "_"))]
        judged = bool(self.judge_model or self.judge_url)
        if self.reward and judged:
            problems.append("--online takes --reward or a judge (--judge-model/--judge-url), not both")
        elif judged:
            problems += self.judge_problems()
        else:
            problems += [p.replace("--reward is required", "--online needs --reward or --judge-model")
                         for p in check_reward_combination(self.reward, self.reward_weight, self.reward_gate)]
        if self.max_new_tokens < 1 or self.judge_max_new_tokens < 1:
            problems.append("--max-new-tokens and --judge-max-new-tokens must be >= 1")
        elif self.max_length <= self.max_new_tokens:
            problems.append(f"--max-length ({self.max_length}) must exceed --max-new-tokens ({self.max_new_tokens}): "
                            "it bounds prompt plus completion")
        if self.temperature <= 0:
            problems.append(f"--temperature must be > 0 (got {self.temperature})")
        return problems

    def offline_problems(self) -> list[str]:
        given = [name for name in ("prompts", "reward", "reward_weight", "reward_gate", "judge_model", "judge_url")
                 if getattr(self, name)]
        given += ["sample_dtype"] if self.sample_dtype != "float32" else []
        return [f"--{name.replace('_', '-')} is for --online" for name in given]


# ---------------------------------------------------------------- data


@dataclass
class EncodedPair:
    """One pair as token ids: ``group`` holds the shared prompt and [chosen, rejected]."""

    group: Group
    margin: float
    truncated: bool = False


def encode_pair(tokenizer, ex: PreferenceExample, max_length: int, truncation: str = "truncate"
                ) -> EncodedPair | None:
    """Tokenise a pair with a shared prompt; truncate both sequences together.

    Over ``max_length``: ``truncate`` cuts the prompt from the left (keeping at least one token)
    and then each completion from the right, as :func:`rlhfkit.data.chat.encode` does for one
    sequence; ``drop`` returns None. Raises ValueError when a completion has no trained token.
    """
    chosen = encode(tokenizer, ex.prompt, ex.chosen)
    rejected = encode(tokenizer, ex.prompt, ex.rejected)
    shared = min(chosen.prompt_length, rejected.prompt_length)
    p = 0
    while p < shared and chosen.input_ids[p] == rejected.input_ids[p]:
        p += 1
    if p == 0:
        raise ValueError("chosen and rejected share no prompt token")
    prompt = chosen.input_ids[:p]
    parts = [(chosen.input_ids[p:], chosen.trained[p:]), (rejected.input_ids[p:], rejected.trained[p:])]
    longest = p + max(len(ids) for ids, _ in parts)
    truncated = longest > max_length
    if truncated:
        if truncation == "drop":
            return None
        prompt = prompt[min(longest - max_length, p - 1):]
        room = max_length - len(prompt)
        parts = [(ids[:room], trained[:room]) for ids, trained in parts]
    for name, (_, trained) in zip(("chosen", "rejected"), parts):
        if not any(trained):
            raise ValueError(f"the {name} completion has no trained token" +
                             (f" after truncation to --max-length {max_length}" if truncated else ""))
    group = Group(prompt, [ids for ids, _ in parts], [trained for _, trained in parts])
    return EncodedPair(group, float(ex.margin or 0.0), truncated)


def encode_pairs(tokenizer, examples: list[PreferenceExample], path: str, max_length: int,
                 truncation: str = "truncate", say=None) -> list[EncodedPair]:
    """Every pair of ``path`` tokenised under the length policy (:mod:`rlhfkit.data.length`);
    problems name the file and record; ``say`` receives the truncation report."""

    def encode_one(ex: PreferenceExample) -> tuple[EncodedPair | None, bool]:
        pair = encode_pair(tokenizer, ex, max_length, truncation)
        return pair, pair is None or pair.truncated

    return apply_length_policy(examples, encode_one, source=path, max_length=max_length, truncation=truncation,
                               say=say)


# ---------------------------------------------------------------- loss


def preference_losses(cfg, policy: torch.Tensor, ref: torch.Tensor | None, lengths: torch.Tensor,
                      margins: torch.Tensor | None = None):
    """Per-pair losses and implicit rewards from log-probs laid out [chosen, rejected] per pair.

    ``policy``, ``ref``, ``lengths``: ``[B, 2]``. A margin m shifts the reference log-ratio:
    passing ``ref_chosen + m/β`` turns βΔ into βΔ − m in the sigmoid/robust/hinge losses; the
    returned rewards are the unshifted β·(log π − log π_ref).
    """
    ref_chosen, ref_rejected = (None, None) if ref is None else (ref[:, 0], ref[:, 1])
    shift = None
    if margins is not None and cfg.loss in MARGIN_LOSSES and bool((margins != 0).any()):
        shift = margins.to(policy.dtype)
        ref_chosen = ref_chosen + shift / cfg.beta
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        policy[:, 0], policy[:, 1], ref_chosen, ref_rejected, beta=cfg.beta, loss_type=cfg.loss,
        label_smoothing=cfg.label_smoothing, chosen_lengths=lengths[:, 0], rejected_lengths=lengths[:, 1],
        gamma=cfg.simpo_gamma if cfg.loss == "simpo" else None)
    if shift is not None:
        chosen_rewards = chosen_rewards + shift
    return losses, chosen_rewards, rejected_rewards


def pair_stats(policy: torch.Tensor, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict:
    """Sums over the pairs (optimizer_step sums micro-batches; the recipe divides by the pair count)."""
    policy = policy.detach()
    return {"rewards/chosen": chosen_rewards.sum(), "rewards/rejected": rejected_rewards.sum(),
            "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).sum(),
            "logps/chosen": policy[:, 0].sum(), "logps/rejected": policy[:, 1].sum()}


class Reference:
    """Where π_ref comes from: a cached table, a frozen model, the policy with adapters off, or none."""

    def __init__(self, table: dict[str, torch.Tensor] | None = None, model=None, adapters_off: bool = False):
        self.table, self.model, self.adapters_off = table, model, adapters_off

    def logps(self, split: str, indices: list[int], pairs: list[EncodedPair], policy_model, packed: bool,
              pad_id: int) -> torch.Tensor | None:
        if self.table is not None:
            return self.table[split][indices]
        scored = self.score([pairs[i].group for i in indices], policy_model, packed, pad_id)
        return None if scored is None else scored.logps.view(-1, 2)

    def score(self, groups: list[Group], policy_model, packed: bool, pad_id: int) -> Scored | None:
        """log π_ref of every completion of ``groups``, run now without gradients (None: reference-free)."""
        if self.model is None and not self.adapters_off:
            return None
        model = self.model if self.model is not None else policy_model
        context = adapters_disabled(policy_model) if self.adapters_off else nullcontext()
        with torch.no_grad(), context:
            return completion_logps(model, groups, packed and supports_packing(model), pad_id)


def batch_loss(model, pairs: list[EncodedPair], indices: list[int], reference: Reference, cfg, packed: bool,
               pad_id: int, split: str = "train"):
    """Sum of the per-pair losses of ``indices`` and the summed statistics (one forward)."""
    scored = completion_logps(model, [pairs[i].group for i in indices], packed, pad_id)
    policy = scored.logps.view(-1, 2)
    ref = reference.logps(split, indices, pairs, model, packed, pad_id)
    if ref is not None:
        ref = ref.to(policy.device, policy.dtype)
    margins = torch.tensor([pairs[i].margin for i in indices], device=policy.device) if cfg.use_margin else None
    losses, chosen_rewards, rejected_rewards = preference_losses(cfg, policy, ref, scored.lengths.view(-1, 2),
                                                                 margins)
    return losses.sum(), {**pair_stats(policy, chosen_rewards, rejected_rewards), "tokens": scored.tokens}


# ---------------------------------------------------------------- reference log-probs


def reference_key(cfg, splits: dict[str, list[EncodedPair]]) -> str:
    """Hash of the tokenised pairs (covers data, tokenizer, template, truncation) and the reference."""
    identity = {"ref": model_fingerprint(cfg.ref_model or cfg.model), "dtype": cfg.dtype,
                "adapters_off": bool(cfg.lora_r and not cfg.ref_model)}
    return ref_cache.reference_key(identity, {name: [p.group for p in pairs] for name, pairs in splits.items()})


def precompute_reference(run: Run, cfg, model, splits: dict[str, list[EncodedPair]], packed: bool, pad_id: int,
                         adapters_off: bool = False) -> dict[str, torch.Tensor]:
    """log π_ref of every [chosen, rejected] pair of every split ([N, 2] float64), cached as
    ref-logps-<key>.pt in --output (:func:`rlhfkit.models.reference.precompute_reference`)."""

    def score(groups: list[Group]) -> list:
        return completion_logps(model, groups, packed, pad_id).logps.view(-1, 2).double().cpu().tolist()

    return ref_cache.precompute_reference(
        run, model, {name: [p.group for p in pairs] for name, pairs in splits.items()}, score,
        name="ref-logps", key=reference_key(cfg, splits), batch_size=cfg.ref_batch_size, adapters_off=adapters_off,
        desc="reference log-probs", unit="pairs", show_progress=cfg.progress,
        finish=lambda rows: torch.tensor(rows, dtype=torch.float64).view(-1, 2))


def disable_dropout(model, adapters: bool = False) -> None:
    """Dropout off in the model (in LoRA adapters too with ``adapters``), so π = π_ref at step 0, as TRL does."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout) and (adapters or "lora_dropout" not in name):
            module.p = 0.0
        if hasattr(module, "attention_dropout") and isinstance(module.attention_dropout, float):
            module.attention_dropout = 0.0


def load_reference_model(run: Run, cfg):
    """--ref-model, frozen and in eval mode with dropout off, on this process's device."""
    from rlhfkit.models.loading import load_causal_lm

    ref_model = load_causal_lm(cfg.ref_model, cfg.dtype, run.accelerator.device, cfg.quantization_bits).eval()
    ref_model.requires_grad_(False)
    disable_dropout(ref_model)
    return ref_model


def live_reference(run: Run, cfg, model) -> Reference:
    """The reference run at every step: --ref-model; else, with LoRA, the policy with its adapters
    disabled (no second copy); else a frozen copy of the initial policy."""
    if cfg.ref_model:
        return Reference(model=load_reference_model(run, cfg))
    if cfg.lora_r:
        return Reference(adapters_off=True)
    ref_model = copy.deepcopy(model).eval()  # on the policy's device, in its dtype
    ref_model.requires_grad_(False)
    return Reference(model=ref_model)


def build_reference(run: Run, cfg, model, splits, packed: bool, pad_id: int) -> Reference:
    """The reference as the loss will read it (see the module docstring, step 2)."""
    if cfg.loss in REFERENCE_FREE:
        return Reference()
    if not cfg.precompute_ref:
        return live_reference(run, cfg, model)
    if cfg.ref_model:
        ref_model = load_reference_model(run, cfg)
        table = precompute_reference(run, cfg, ref_model, splits, packed and supports_packing(ref_model), pad_id)
        del ref_model
        return Reference(table=table)
    return Reference(table=precompute_reference(run, cfg, model, splits, packed, pad_id, bool(cfg.lora_r)))


# ---------------------------------------------------------------- recipe


def evaluate(model, pairs: list[EncodedPair], reference: Reference, cfg, packed: bool, pad_id: int) -> dict:
    def loss_fn(indices: list[int]):
        return batch_loss(model, pairs, indices, reference, cfg, packed, pad_id, split="eval")

    return evaluate_means(model, len(pairs), cfg.eval_batch_size, loss_fn)


def train(cfg: Config, run: Run) -> TrainResult:
    from rlhfkit.models.loading import load_tokenizer

    if cfg.online:
        from rlhfkit.recipes.online_dpo import train as train_online

        return train_online(cfg, run)
    acc = run.accelerator
    tokenizer = load_tokenizer(cfg.model)
    pad_id = tokenizer.pad_token_id
    train_pairs = encode_pairs(tokenizer, load_preferences(cfg.data, config=cfg.data_config, seed=cfg.seed),
                               cfg.data, cfg.max_length, cfg.truncation, run.print)
    eval_pairs = encode_pairs(tokenizer, load_preferences(cfg.eval_data, config=cfg.data_config, seed=cfg.seed),
                              cfg.eval_data, cfg.max_length, cfg.truncation, run.print) if cfg.eval_data else []
    if cfg.use_margin and cfg.loss not in MARGIN_LOSSES and any(p.margin for p in train_pairs):
        run.print(f"note: --loss {cfg.loss} ignores the records' margin field")

    model = build_model(cfg, acc.device)
    disable_dropout(model)
    packed = cfg.packed and supports_packing(model)
    if cfg.packed and not packed:
        run.print(f"note: {type(model).__name__} has no packed path; using padded rows")
    splits = {"train": train_pairs, **({"eval": eval_pairs} if eval_pairs else {})}
    reference = build_reference(run, cfg, model, splits, packed, pad_id)

    training = setup_training(run, cfg, model, len(train_pairs))
    model = training.model

    def loss_fn(indices: list[int]):
        return batch_loss(model, train_pairs, indices, reference, cfg, packed, pad_id)

    def final_eval() -> dict[str, float]:
        return evaluate(model, eval_pairs, reference, cfg, packed, pad_id)

    logged = fit(run, cfg, training, loss_fn, desc=f"dpo ({cfg.loss})", per_example=METRIC_KEYS,
                 postfix={"acc": "rewards/accuracies"}, evaluate=final_eval if eval_pairs else None)
    return TrainResult.of(run, logged, save_final_model(run, model, tokenizer, cfg.merge_lora))


def main(cfg: Config) -> int:
    """Train; also callable from Python: ``main(Config(model=..., data=..., output=...))``."""
    with start_run(validated(cfg)) as run:
        metrics = train(cfg, run).metrics
    if metrics:
        run.print(f"dpo ({'online, ' if cfg.online else ''}{cfg.loss}) done: loss {metrics['loss']:.4f}, reward "
                  f"accuracy {metrics['rewards/accuracies']:.2f}, margin {metrics['rewards/margins']:.3f}" +
                  (f"; score {metrics['objective/scores']:.4f}" if "objective/scores" in metrics else "") +
                  (f"; eval loss {metrics['eval/loss']:.4f}" if "eval/loss" in metrics else "") +
                  f"; model saved to {run.output}")
    return 0
