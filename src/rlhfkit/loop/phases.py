"""The five phases of a round of ``rlhfkit loop``, each an ordinary rlhfkit command run in-process.

Every phase writes its outputs into its folder of ``OUTPUT/round-N/`` and returns a small summary,
which the loop saves as the folder's done-marker (``done.json``) once the outputs are in place:

    samples/       `rlhfkit generate` output: K completions per prompt (and their scores)
    pairs/         pairs.jsonl (this round's preferences) and cumulative.jsonl (every round's so far)
    reward_model/  an `rlhfkit rm` run on cumulative.jsonl
    policy/        an `rlhfkit dpo`, `ppo` or `rejection-sampling` run from the round's starting policy
    eval/          replies to the held-out prompts, their scores, win rate over round 0 and KL to it
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean
from typing import Any

from rlhfkit.data.io import read_records, write_jsonl
from rlhfkit.errors import InputError
from rlhfkit.loop.plan import OPTIMISERS, Plan, command_config, judge_owned, optimise_owned, rm_owned, sample_owned
from rlhfkit.models.backends import BackendError


class LabelsNeeded(Exception):
    """The round's pairs wait for people: the import file is written, the loop stops (exit 0)."""


@dataclass
class Round:
    """Where round ``index`` works, and the policy it starts from."""

    index: int
    folder: Path
    policy: str          # round 0's model, or the previous round's policy folder
    output: Path         # the loop's --output
    resume: bool = False  # continue the phase's own run with the recipe's --resume

    def phase(self, name: str) -> Path:
        return self.folder / name


def read_rows(path: str | Path) -> list[dict]:
    return [rec.data for rec in read_records(str(path))]


def run_recipe(module_name: str, cfg):
    """A recipe's ``train(cfg, run)`` in-process, as its command runs it."""
    import importlib

    from rlhfkit.training import start_run

    recipe = importlib.import_module(module_name)
    with start_run(cfg) as run:
        return recipe.train(cfg, run)


# ------------------------------------------------------------------ 1. sample


def sample(plan: Plan, rnd: Round) -> dict:
    """K completions per prompt from the round's policy with `rlhfkit generate` (scored by the label reward)."""
    from rlhfkit.generation import command as generate

    out = rnd.phase("samples") / "completions.jsonl"
    cfg = command_config("rlhfkit.generation.command", plan.sample,
                         sample_owned(plan, rnd.policy, out, rnd.index), "sample")
    generate.main(cfg)
    rows = read_rows(out)
    scores = [s for row in rows for s in row.get("scores", [])]
    return {"file": str(out), "prompts": len(rows), "completions": sum(len(r["completions"]) for r in rows),
            "mean_score": fmean(scores) if scores else None}


# ------------------------------------------------------------------ 2. label


def prompt_of(row: dict) -> Any:
    """The prompt of a `rlhfkit generate` row: its ``prompt``, or its ``messages``."""
    return row["prompt"] if "prompt" in row else row["messages"]


def scored_pairs(rows: list[dict], rule: str, min_gap: float) -> list[dict]:
    """Preference pairs from each row's completions and their ``scores``: every two distinct
    completions (``all``; a completion sampled twice is compared once) or the best against the
    worst (``best-worst``), the higher score chosen; pairs whose scores differ by ``min_gap`` or
    less are dropped."""
    from rlhfkit.demo import candidate_pairs

    pairs = []
    for row in rows:
        score = dict(zip(row["completions"], row["scores"]))
        ranked = sorted(score, key=score.get)
        candidates = candidate_pairs(list(score) if rule == "all" else ranked[-1:] + ranked[:1])
        for a, b in candidates:
            if abs(score[a] - score[b]) > min_gap:
                chosen, rejected = (a, b) if score[a] > score[b] else (b, a)
                pairs.append({"prompt": prompt_of(row), "chosen": chosen, "rejected": rejected,
                              "chosen_score": score[chosen], "rejected_score": score[rejected]})
    return pairs


def ai_pairs(plan: Plan, rnd: Round, samples_file: str) -> list[dict]:
    """Every pair of the round's completions labelled by the judge, as `rlhfkit ai-label` labels them
    (its outputs in pairs/ai_label/, journaled: a resumed round asks nothing twice); ties left out."""
    from rlhfkit.data.constitution import load_constitution
    from rlhfkit.label import ai_label

    cfg = command_config("rlhfkit.label.ai_label", plan.label.ai_label,
                         {"data": samples_file, "output": str(rnd.phase("pairs") / "ai_label")}, "label.ai_label")
    labelling = ai_label.label_comparisons(cfg, ai_label.read_comparisons(cfg), load_constitution(cfg.constitution))
    if labelling.failure is not None:
        raise BackendError(f"{labelling.failure} (the judge's replies so far are kept in {cfg.output}: rerun with "
                           "--resume to continue)")
    return [row for row in labelling.rows if not row.get("tie")]


def human_pairs(plan: Plan, rnd: Round, samples_file: str) -> list[dict]:
    """The exported judgments of the round's pairs; until they exist, the label-app import file and
    what to do (LabelsNeeded)."""
    from rlhfkit.demo import candidate_pairs
    from rlhfkit.label.importer import storable_text

    judgments = plan.judgments(rnd.output, rnd.index)
    if judgments.exists():
        return [row for row in read_rows(judgments) if not row.get("tie")]
    to_label = rnd.phase("pairs") / "to_label.jsonl"
    # model output may hold NUL characters, which the label database refuses: shown as U+FFFD
    write_jsonl(to_label, [{"prompt": prompt_of(row), "response_a": storable_text(a),
                            "response_b": storable_text(b), "loop_round": rnd.index}
                           for row in read_rows(samples_file)
                           for a, b in candidate_pairs(list(dict.fromkeys(row["completions"])))])
    raise LabelsNeeded(
        f"round {rnd.index}: the pairs wait for people. Import them, label them, export the judgments, resume:\n"
        f"  rlhfkit label import {to_label} --db labels.db\n"
        f"  rlhfkit label serve --db labels.db      (annotators judge the pairs)\n"
        f"  rlhfkit label export --db labels.db --output {judgments}\n"
        f"  rlhfkit loop --plan PLAN --output {rnd.output} --resume")


def label(plan: Plan, rnd: Round, samples: dict, earlier_pairs: list[str]) -> dict:
    """This round's preference pairs (pairs.jsonl) and every round's so far (cumulative.jsonl)."""
    if plan.label.source == "reward":
        pairs = scored_pairs(read_rows(samples["file"]), plan.label.pairs, plan.label.min_gap)
    elif plan.label.source == "ai":
        pairs = ai_pairs(plan, rnd, samples["file"])
    else:
        pairs = human_pairs(plan, rnd, samples["file"])
    if not pairs:
        raise InputError(f"round {rnd.index}: no preference pairs (every prompt's completions were identical, "
                         "tied or within label.min_gap)")
    folder = rnd.phase("pairs")
    file = write_jsonl(folder / "pairs.jsonl", pairs)
    everything = [row for path in earlier_pairs for row in read_rows(path)] + pairs
    return {"file": file, "pairs": len(pairs), "cumulative": write_jsonl(folder / "cumulative.jsonl", everything),
            "cumulative_pairs": len(everything)}


# ------------------------------------------------------------------ 3-4. train


def reward_model(plan: Plan, rnd: Round, pairs: dict, previous: str | None) -> dict:
    """`rlhfkit rm` on every preference so far: from the backbone, or (start: extend) from ``previous``."""
    options = plan.reward_model.options
    start = previous if plan.reward_model.start == "extend" and previous else None
    resume = rnd.resume and not options.get("save_only_model")
    cfg = command_config("rlhfkit.recipes.rm", options,
                         rm_owned(pairs["cumulative"], rnd.phase("reward_model"), resume, start), "reward_model")
    result = run_recipe("rlhfkit.recipes.rm", cfg)
    return {"path": str(result.final_model), "started_from": cfg.model, "metrics": result.metrics}


def optimise(plan: Plan, rnd: Round, pairs: dict, reward_model_result: dict | None) -> dict:
    """The round's policy: dpo on its pairs, or ppo / rejection-sampling against its reward, from the current policy."""
    options = plan.optimise.options
    reward = plan.label.reward if plan.optimise.reward == "label" else (reward_model_result or {}).get("path", "")
    resume = rnd.resume and not options.get("save_only_model")
    module = OPTIMISERS[plan.optimise.method]
    cfg = command_config(module, options, optimise_owned(plan, rnd.policy, pairs["file"], reward,
                                                         rnd.phase("policy"), resume), "optimise")
    result = run_recipe(module, cfg)
    return {"path": str(result.final_model), "started_from": rnd.policy, "method": plan.optimise.method,
            "metrics": result.metrics}


# ------------------------------------------------------------------ 5. evaluate


def held_out(plan: Plan) -> list:
    from rlhfkit.data.schema import load_prompts

    return [ex.prompt for ex in load_prompts(plan.eval_prompts, seed=plan.seed)][:plan.evaluate.limit]


def replies(plan: Plan, model, tokenizer, prompts: list, n: int):
    """(prompt ids, response ids, texts) of ``n`` replies per prompt at the evaluation's settings."""
    from rlhfkit.evaluation.frontier import sample_policy

    ev = plan.evaluate
    return sample_policy(model, tokenizer, prompts, ev.temperature, ev.max_new_tokens, ev.seed, n)


def write_replies(path: Path, prompts: list, texts: list[str], scores: list[float]) -> None:
    write_jsonl(path, [{"prompt": p, "reply": t, "score": s} for p, t, s in zip(prompts, texts, scores)])


def baseline(plan: Plan, folder: Path) -> dict:
    """Round 0: its replies to the held-out prompts and their scores, the baseline of every win rate."""
    from rlhfkit.models.loading import load_policy
    from rlhfkit.rl.rewards import load_reward

    prompts, n = held_out(plan), plan.evaluate.baseline_samples
    model, tokenizer = load_policy(plan.model)
    _, _, texts = replies(plan, model, tokenizer, prompts, n)
    shown = [p for p in prompts for _ in range(n)]
    scores = load_reward(plan.eval_reward)(shown, texts)
    write_replies(folder / "replies.jsonl", shown, texts, scores)
    return {"round": 0, "score": fmean(scores), "win_rate": 0.5, "win_rate_stderr": 0.0, "kl": 0.0,
            "mean_words": fmean(len(t.split()) for t in texts), "policy": plan.model,
            "scores": [scores[i:i + n] for i in range(0, len(scores), n)], "replies": texts[::n]}


def evaluate(plan: Plan, rnd: Round, policy: str, round0: dict) -> dict:
    """The round's policy on the held-out prompts: mean score, win rate over round 0's replies
    (through the evaluation reward) and KL(policy ‖ round 0) from its own samples."""
    from rlhfkit.demo import oracle_win_rate
    from rlhfkit.evaluation.divergence import kl_to_reference
    from rlhfkit.evaluation.frontier import load_run_policy, sample_groups
    from rlhfkit.models.loading import load_policy
    from rlhfkit.rl.rewards import load_reward

    prompts = held_out(plan)
    initial, tokenizer = load_policy(plan.model)
    model = load_run_policy(policy, plan.model)
    prompt_ids, response_ids, texts = replies(plan, model, tokenizer, prompts, 1)
    kl = kl_to_reference(model, initial, sample_groups(prompt_ids, response_ids), plan.evaluate.temperature)
    scores = load_reward(plan.eval_reward)(prompts, texts)
    write_replies(rnd.phase("eval") / "replies.jsonl", prompts, texts, scores)
    wins = oracle_win_rate(scores, round0["scores"])
    point = {"round": rnd.index, "score": fmean(scores), "win_rate": wins.win_rate, "win_rate_stderr": wins.stderr,
             "kl": kl, "mean_words": fmean(len(t.split()) for t in texts), "policy": policy}
    if plan.evaluate.judge:
        point.update(judged_win_rate(plan, rnd, prompts, texts, round0["replies"]))
    return point


def judged_win_rate(plan: Plan, rnd: Round, prompts: list, texts: list[str], round0: list[str]) -> dict:
    """`rlhfkit judge --mode winrate`: each held-out reply against round 0's first reply to the prompt,
    both orders (its outputs, journaled, in eval/judge/)."""
    from rlhfkit.data.chat import prompt_text
    from rlhfkit.evaluation import judge

    folder = rnd.phase("eval") / "judge"
    questions = write_jsonl(folder / "questions.jsonl", [{"question_id": i, "category": "held-out",
                                                          "turns": [prompt_text(p)]} for i, p in enumerate(prompts)])
    answers = write_jsonl(folder / "answers.jsonl", [
        {"question_id": i, "model": name, "answer": reply} for name, replies in (("round-0", round0),
                                                                                (f"round-{rnd.index}", texts))
        for i, reply in enumerate(replies)])
    cfg = command_config("rlhfkit.evaluation.judge", plan.evaluate.judge, judge_owned(questions, answers, folder),
                         "evaluate.judge")
    if judge.main(cfg) != 0:
        raise BackendError(f"the judge of round {rnd.index}'s evaluation failed (see above; its replies so far are "
                           f"kept in {folder}: rerun with --resume to continue)")
    record = json.loads((folder / "results.json").read_text())["summary"]["models"][f"round-{rnd.index}"]
    return {"judge_win_rate": record["win_rate"], "judge_win_rate_stderr": record["stderr"],
            "judge_lc_win_rate": record["lc_win_rate"]}
