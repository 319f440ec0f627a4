"""The plan of ``rlhfkit loop``: a YAML file read into typed dataclasses and checked before any model loads.

A plan names the starting policy, the prompts, the number of rounds, and for each phase either a
few loop settings or the options of the ordinary command that phase runs (``sample`` holds
``rlhfkit generate``'s options, ``reward_model.options`` ``rlhfkit rm``'s, ``optimise.options`` those
of ``rlhfkit dpo``/``ppo``/``rejection-sampling``, ``label.ai_label`` ``rlhfkit ai-label``'s). Each of
those is checked by that command's own config class, with the values the loop sets itself
(model, data, prompts, output, ...) filled in: a value the command would refuse is refused here,
before anything runs. Every problem is one line naming the plan file and the field.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from rlhfkit.config import arg, build_config, check_data_flag, config_aliases, read_yaml_mapping
from rlhfkit.errors import InputError

LabelSource = Literal["reward", "ai", "human"]
PairRule = Literal["all", "best-worst"]
Optimiser = Literal["dpo", "ppo", "rejection-sampling"]
OPTIMISERS: dict[str, str] = {"dpo": "rlhfkit.recipes.dpo", "ppo": "rlhfkit.recipes.ppo",
                              "rejection-sampling": "rlhfkit.recipes.rejection_sampling"}
# Stands in for the round's reward model (not trained yet) when a plan is checked.
REWARD_MODEL_PLACEHOLDER = "rlhfkit.loop:round_reward_model"


@dataclass
class LabelPlan:
    """Phase 2: who turns each prompt's K completions into preference pairs."""

    source: LabelSource = arg("reward", "reward: a reward function scores the completions (`reward`); ai: an AI "
                              "judge labels every pair as `rlhfkit ai-label` does (`ai_label`); human: the loop "
                              "writes a label-app import file and stops until `judgments` exists.")
    reward: str = arg("", "source reward: the reward, any `--reward` SPEC (file.py:function, module:function, a "
                      "reward-model folder, an http URL).")
    pairs: PairRule = arg("all", "source reward: `all` compares every two distinct completions of a prompt "
                          "(InstructGPT's K choose 2); `best-worst` only the highest against the lowest.")
    min_gap: float = arg(0.0, "source reward: pairs whose scores differ by this much or less are dropped.")
    judgments: str = arg("", "source human: where `rlhfkit label export` writes a round's judgments, `{round}` "
                         "standing for the round number (default OUTPUT/round-{round}/pairs/judgments.jsonl).")
    ai_label: dict = arg(default_factory=dict, help="source ai: options of `rlhfkit ai-label` (judge_model, "
                         "judge_url, constitution, ...); data and output are the loop's.")

    def validate(self) -> list[str]:
        problems = []
        if self.source == "reward":
            problems += [p.replace("--reward", "reward") for p in _reward_problems(self.reward)]
        elif self.reward:
            problems.append(f"reward: applies to source reward only (source is {self.source})")
        if self.min_gap < 0:
            problems.append(f"min_gap: must be >= 0 (got {self.min_gap})")
        if self.ai_label and self.source != "ai":
            problems.append(f"ai_label: applies to source ai only (source is {self.source})")
        return problems


@dataclass
class RewardModelPlan:
    """Phase 3: the reward model, retrained (or extended) each round on every preference so far."""

    train: bool = arg(True, "Train a reward model each round (ppo and rejection-sampling optimise against it).")
    start: Literal["retrain", "extend"] = arg("retrain", "retrain: from the backbone (options.model) each round; "
                                              "extend: from the previous round's reward model.")
    options: dict = arg(default_factory=dict, help="Options of `rlhfkit rm` (model, epochs, lr, ...); data, output "
                        "and resume are the loop's.")


@dataclass
class OptimisePlan:
    """Phase 4: the policy optimised from the current one."""

    method: Optimiser = arg("dpo", "dpo: on the round's pairs; ppo or rejection-sampling: against `reward`.")
    reward: Literal["reward-model", "label"] = arg(
        "reward-model", "ppo and rejection-sampling: the round's reward model, or the label reward itself.")
    options: dict = arg(default_factory=dict, help="Options of the method's command (lr, max_steps, beta, ...); "
                        "model, data/prompts, reward, output and resume are the loop's.")


@dataclass
class EvaluatePlan:
    """Phase 5: each round's policy against round 0's on held-out prompts."""

    reward: str = arg("", "What judges the replies: a reward SPEC or an oracle function (default: label.reward).")
    baseline_samples: int = arg(2, "Round 0's replies per held-out prompt: each round's reply is compared with each.")
    limit: int = arg(64, "Use at most this many held-out prompts.")
    max_new_tokens: int = arg(32, "Tokens per reply.")
    temperature: float = arg(0.7, "Sampling temperature of the replies (and of the KL).")
    seed: int = arg(1, "Sampling seed of the replies (the same every round).")
    judge: dict = arg(default_factory=dict, help="Also a judge's win rate over round 0 (`rlhfkit judge --mode winrate` "
                      "on each held-out prompt's reply against round 0's first): its options (judge_model, judge_url, "
                      "judge_api_key_env, ...); mode, questions, answers, baseline and output are the loop's.")

    def validate(self) -> list[str]:
        problems = [f"{name}: must be >= 1 (got {getattr(self, name)})"
                    for name in ("baseline_samples", "limit", "max_new_tokens") if getattr(self, name) < 1]
        if self.temperature <= 0:
            problems.append(f"temperature: must be > 0 (got {self.temperature})")
        return problems


@dataclass
class Plan:
    """Iterative RLHF in rounds: sample -> label -> reward model -> optimise -> evaluate."""

    model: str = arg("smollm2-135m", "Round 0's policy: a local path, hub id or embedded name.")
    prompts: str = arg("", "The prompts sampled every round (a prompts file or dataset, docs/data.md).")
    eval_prompts: str = arg("", "Held-out prompts of the evaluation.")
    rounds: int = arg(2, "Number of rounds.")
    seed: int = arg(0, "Round N samples with seed + N; training phases use their options' seed.")
    sample: dict = arg(default_factory=dict, help="Options of `rlhfkit generate` (samples_per_prompt, "
                       "max_new_tokens, temperature, ...); model, prompts, output, seed and reward are the loop's.")
    label: LabelPlan = arg(default_factory=LabelPlan, help="Phase 2.")
    reward_model: RewardModelPlan = arg(default_factory=RewardModelPlan, help="Phase 3.")
    optimise: OptimisePlan = arg(default_factory=OptimisePlan, help="Phase 4.")
    evaluate: EvaluatePlan = arg(default_factory=EvaluatePlan, help="Phase 5.")

    def validate(self) -> list[str]:
        problems = [p.removeprefix("--") for p in check_data_flag("prompts", self.prompts)
                    + check_data_flag("eval_prompts", self.eval_prompts)]
        if self.rounds < 1:
            problems.append(f"rounds: must be >= 1 (got {self.rounds})")
        if self.optimise.method != "dpo" and self.optimise.reward == "reward-model" and not self.reward_model.train:
            problems.append(f"optimise.reward: reward-model needs reward_model.train (the {self.optimise.method} "
                            "phase optimises against it)")
        if self.optimise.reward == "label" and self.label.source != "reward":
            problems.append("optimise.reward: label needs label.source reward (a reward function to optimise)")
        if not (self.evaluate.reward or self.label.reward):
            problems.append("evaluate.reward: required unless label.reward is given (a reward SPEC or an oracle)")
        elif self.evaluate.reward:
            problems += [f"evaluate.{p.removeprefix('--')}" for p in _reward_problems(self.evaluate.reward)]
        return problems

    @property
    def optimise_reward(self) -> str:
        """The reward of ppo and rejection-sampling (the placeholder stands for the round's reward model)."""
        return self.label.reward if self.optimise.reward == "label" else REWARD_MODEL_PLACEHOLDER

    @property
    def eval_reward(self) -> str:
        return self.evaluate.reward or self.label.reward

    def judgments(self, output: Path, round_index: int) -> Path:
        """Where round ``round_index``'s exported human judgments are read from."""
        if self.label.judgments:
            return Path(self.label.judgments.replace("{round}", str(round_index)))
        return output / f"round-{round_index}" / "pairs" / "judgments.jsonl"


def _reward_problems(spec: str) -> list[str]:
    from rlhfkit.rl.rewards import check_reward_spec

    return check_reward_spec(spec)


# ------------------------------------------------------------------ the ordinary commands' options


def command_config(module: str, options: dict, owned: dict[str, Any], where: str):
    """``module``'s Config from the plan's ``options`` and the values the loop sets (``owned``), checked
    as the command checks it; InputError naming ``where`` (e.g. ``plan.yaml: optimise.options``)."""
    if not isinstance(options, dict):
        raise InputError(f"{where}: expected a mapping of options to values")
    cls = importlib.import_module(module).Config
    known = {f.name for f in dataclasses.fields(cls) if f.init} | set(config_aliases(cls))
    problems = [f"{where}: '{key}' is set by the loop" for key in options if key in owned]
    problems += [f"{where}: unknown option '{key}'" for key in options if key not in known]
    if problems:
        raise InputError(problems)
    try:
        return build_config(cls, {**options, **owned})
    except InputError as e:
        raise InputError([f"{where}: {p}" for p in e.problems]) from None


def sample_owned(plan: Plan, policy: str, output: Path, round_index: int) -> dict[str, Any]:
    """The options of round ``round_index``'s `rlhfkit generate` that the loop sets."""
    reward = [plan.label.reward] if plan.label.source == "reward" else []
    return {"model": policy, "prompts": plan.prompts, "output": str(output), "seed": plan.seed + round_index,
            "reward": reward, "reward_weight": [], "reward_gate": "", "best_of": 0, "model_url": "", "model_name": ""}


def optimise_owned(plan: Plan, policy: str, pairs: str, reward: str, output: Path, resume: bool) -> dict[str, Any]:
    """The options of the optimise phase's recipe that the loop sets."""
    inputs = {"data": pairs} if plan.optimise.method == "dpo" else {
        "prompts": plan.prompts, "reward": [reward], "reward_weight": [], "reward_gate": ""}
    return {"model": policy, **inputs, "output": str(output), "resume": resume}


def rm_owned(data: str, output: Path, resume: bool, model: str | None = None) -> dict[str, Any]:
    return {"data": data, "output": str(output), "resume": resume, **({"model": model} if model else {})}


def judge_owned(questions: str, answers: str, output: Path) -> dict[str, Any]:
    """The options of the evaluation's `rlhfkit judge` that the loop sets (round 0 is the baseline)."""
    return {"mode": "winrate", "questions": questions, "answers": [answers], "baseline": "round-0",
            "output": str(output), "model": [], "model_url": "", "model_name": []}


def _options_problems(plan: Plan, file: str) -> list[str]:
    """Every phase's command options checked with stand-ins for the files the loop will write."""
    where = Path("<output>") / "round-1"
    checks = [("rlhfkit.generation.command", plan.sample, sample_owned(plan, plan.model, where / "samples.jsonl", 1),
               "sample"),
              (OPTIMISERS[plan.optimise.method], plan.optimise.options,
               optimise_owned(plan, plan.model, plan.prompts, plan.optimise_reward, where / "policy", False),
               "optimise.options")]
    if plan.reward_model.train:
        checks.append(("rlhfkit.recipes.rm", plan.reward_model.options, rm_owned(plan.prompts, where, False),
                       "reward_model.options"))
    if plan.label.source == "ai":
        checks.append(("rlhfkit.label.ai_label", plan.label.ai_label,
                       {"data": plan.prompts, "output": str(where / "pairs")}, "label.ai_label"))
    if plan.evaluate.judge:
        checks.append(("rlhfkit.evaluation.judge", plan.evaluate.judge,
                       judge_owned(plan.eval_prompts, plan.eval_prompts, where / "eval"), "evaluate.judge"))
    problems = []
    for module, options, owned, name in checks:
        try:
            cfg = command_config(module, options, owned, f"{file}: {name}")
        except InputError as e:
            problems += e.problems
            continue
        if name == "sample" and (cfg.samples_per_prompt < 2 or cfg.strategy == "greedy"):
            problems.append(f"{file}: sample: samples_per_prompt must be >= 2 and strategy not greedy "
                            "(the pairs compare a prompt's completions)")
    return problems


# ------------------------------------------------------------------ reading a plan


SECTIONS = {"label": LabelPlan, "reward_model": RewardModelPlan, "optimise": OptimisePlan, "evaluate": EvaluatePlan}


def _named(prefix: str, problem: str) -> str:
    """A config problem (``--min-gap: ...`` or ``min_gap: ...``) as ``PREFIXmin_gap: ...``."""
    if problem.startswith("--"):
        head, sep, rest = problem[2:].partition(":")
        problem = (head.replace("-", "_") + sep + rest) if sep else problem[2:]
    return prefix + problem


def _section(cls: type, values: Any, prefix: str) -> tuple[Any, list[str]]:
    """``cls`` from a mapping of the plan, or the problems (each ``prefix`` + the field)."""
    if not isinstance(values, dict):
        return None, [f"{prefix.rstrip('.: ')}: expected a mapping of fields to values"]
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = [f"{prefix}{key}: unknown field" for key in values if key not in names]
    if unknown:
        return None, unknown
    try:
        return build_config(cls, dict(values)), []
    except InputError as e:
        return None, [_named(prefix, p) for p in e.problems]


def read_plan(path: str) -> Plan:
    """The plan in ``path``, fully checked (its commands' options included); InputError listing every problem."""
    values = read_yaml_mapping(path, "--plan", "plan fields")
    problems, sections = [], {}
    for name, cls in SECTIONS.items():
        sections[name], found = _section(cls, values.pop(name, {}) or {}, f"{path}: {name}.")
        problems += found
    if problems:
        raise InputError(problems)
    plan, found = _section(Plan, {**values, **sections}, f"{path}: ")
    if found:
        raise InputError(found)
    problems = _options_problems(plan, path)
    if problems:
        raise InputError(problems)
    return plan


def plan_dict(plan: Plan) -> dict:
    """The resolved plan as the YAML the loop saves (``read_plan`` reads it back to the same plan)."""
    return dataclasses.asdict(plan)

