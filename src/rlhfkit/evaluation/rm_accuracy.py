"""Reward-model agreement accuracy (``rlhfkit eval-rm``), RewardBench style.

Agreement: the chosen completion is scored strictly higher than the rejected one (a tie counts
as wrong). Records may carry a ``subset`` field: accuracy is reported per subset, and the
section score weights subsets by their size. The scorer is a reward (model folder,
``file.py:function``, ``module:function``, URL: ``--reward``) or a DPO policy's implicit
reward β·(log π(y|x) − log π_ref(y|x)) (``--model`` with ``--ref-model``).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from rlhfkit.config import DATA_CONFIG_HELP, arg, check_data_flag, validated


def agreement(chosen: list[float], rejected: list[float]) -> dict[str, float]:
    """accuracy (strictly higher; ties wrong), mean margin, and the mean/std of all rewards."""
    n = len(chosen)
    if n == 0:
        return dict.fromkeys(("accuracy", "margin", "reward_mean", "reward_std"), float("nan"))
    correct = sum(c > r for c, r in zip(chosen, rejected))
    both = list(chosen) + list(rejected)
    mean = sum(both) / len(both)
    std = math.sqrt(sum((x - mean) ** 2 for x in both) / len(both))
    return {"accuracy": correct / n, "margin": sum(c - r for c, r in zip(chosen, rejected)) / n,
            "reward_mean": mean, "reward_std": std}


@dataclass
class Config:
    """Agreement accuracy of a reward model (or a DPO policy's implicit reward) on preference pairs."""

    reward: str = arg("", "The scorer: a reward-model folder, file.py:function, module:function or an http URL.")
    model: str = arg("", "A DPO policy scored by its implicit reward beta*(log pi - log pi_ref) (with --ref-model; "
                     "instead of --reward).")
    ref_model: str = arg("", "The reference model of --model's implicit reward.", aliases=("ref",))
    data: str = arg("", "Preference pairs (prompt/chosen/rejected, optional `subset`): a file, a Hugging Face dataset "
                    "id or a mixture (docs/data.md; a mixture is drawn with seed 0).")
    data_config: str = arg("", DATA_CONFIG_HELP)
    beta: float = arg(0.1, "beta of the implicit DPO reward (only scales the margins).")
    output: str = arg("", "Folder for results.json and report.md (optional).")
    eval_batch_size: int = arg(8, "Sequences per forward of --model and --ref-model.", aliases=("batch_size",))
    max_length: int = arg(512, "Maximum tokens of prompt plus completion (with --model: each pair is truncated "
                          "together, as DPO training does).")
    dtype: Literal["float32", "bfloat16"] = arg("float32", "Parameter dtype of the scoring models (on the GPU "
                                                "when there is one).")

    def __post_init__(self):
        if self.ref_model and self.reward and not self.model:  # the spelling before --model existed
            print("note: --reward POLICY with --ref-model is deprecated; use --model POLICY", file=sys.stderr)
            self.model, self.reward = self.reward, ""

    def validate(self) -> list[str]:
        from rlhfkit.rl.rewards import check_reward_spec

        problems = check_data_flag("data", self.data)
        if self.model or self.ref_model:
            if not (self.model and self.ref_model):
                problems.append("--model and --ref-model go together (the implicit reward of a DPO policy)")
            if self.reward:
                problems.append("--reward and --model are two scorers: give one")
        else:
            problems += check_reward_spec(self.reward)
        if self.eval_batch_size < 1:
            problems.append(f"--eval-batch-size must be >= 1 (got {self.eval_batch_size})")
        return problems


def subset_report(examples, chosen: list[float], rejected: list[float]) -> dict:
    """Overall agreement, per-subset accuracy and the size-weighted section score."""
    groups: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        subset = (ex.source.data.get("subset") if ex.source else None) or "all"
        groups.setdefault(str(subset), []).append(i)
    per_subset = {}
    for name, idx in sorted(groups.items()):
        stats = agreement([chosen[i] for i in idx], [rejected[i] for i in idx])
        per_subset[name] = {"accuracy": stats["accuracy"], "n": len(idx)}
    total = sum(v["n"] for v in per_subset.values())
    weighted = sum(v["accuracy"] * v["n"] for v in per_subset.values()) / total
    return {**agreement(chosen, rejected), "n": len(chosen), "subsets": per_subset, "section_score": weighted}


def implicit_reward_scores(policy: str, ref: str, examples, beta: float, batch_size: int, max_length: int,
                           path: str = "", dtype: str = "float32") -> tuple[list[float], list[float]]:
    """DPO's implicit rewards β·(log π(y|x) − log π_ref(y|x)) of the chosen and the rejected
    completion of every pair, exactly as DPO training computes its ``rewards/chosen`` and
    ``rewards/rejected``: each pair encoded by :func:`rlhfkit.recipes.dpo.encode_pairs` (one
    shared prompt, the two sequences truncated together to ``max_length``) and scored by the one
    sequence log-prob API, :func:`rlhfkit.models.packed.completion_logps`, ``batch_size`` pairs
    per forward."""
    import torch

    from rlhfkit.models.loading import load_causal_lm, load_tokenizer
    from rlhfkit.models.packed import completion_logps
    from rlhfkit.recipes.dpo import encode_pairs

    tokenizer = load_tokenizer(policy)
    groups = [pair.group for pair in encode_pairs(tokenizer, examples, path, max_length, say=print)]
    logps = []
    for name in (policy, ref):
        with torch.no_grad():
            scored = completion_logps(load_causal_lm(name, dtype).eval(), groups, pad_id=tokenizer.pad_token_id,
                                      batch_size=batch_size)
        logps.append(scored.logps.view(-1, 2).double())
    rewards = beta * (logps[0] - logps[1])
    return rewards[:, 0].tolist(), rewards[:, 1].tolist()


def main(cfg: Config) -> int:
    from rlhfkit.data.schema import load_preferences

    examples = load_preferences(validated(cfg).data, config=cfg.data_config)
    if cfg.model:
        chosen, rejected = implicit_reward_scores(cfg.model, cfg.ref_model, examples, cfg.beta,
                                                  max(1, cfg.eval_batch_size // 2), cfg.max_length, cfg.data, cfg.dtype)
    else:
        from rlhfkit.rl.rewards import load_reward

        reward = load_reward(cfg.reward, cfg.dtype)
        chosen = reward([e.prompt for e in examples], [e.chosen for e in examples])
        rejected = reward([e.prompt for e in examples], [e.rejected for e in examples])
    result = subset_report(examples, chosen, rejected)
    lines = ["| subset | n | accuracy |", "|---|---:|---:|"]
    lines += [f"| {name} | {v['n']} | {v['accuracy']:.3f} |" for name, v in result["subsets"].items()]
    lines += [f"| **all** | {result['n']} | {result['accuracy']:.3f} |",
              "", f"section score (subsets weighted by size): {result['section_score']:.3f}",
              f"mean margin: {result['margin']:.4f}"]
    table = "\n".join(lines)
    print(table)
    if cfg.output:
        out = Path(cfg.output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(result, indent=1))
        (out / "report.md").write_text(f"# Reward-model agreement\n\nscorer: `{cfg.reward or cfg.model}`\n\n{table}\n")
    return 0
