"""``rlhfkit loop``: iterative RLHF in rounds (InstructGPT's and Llama 2's), offline or with people.

    rlhfkit loop --plan plan.yaml --output loop-out            # all rounds
    rlhfkit loop --plan plan.yaml --output loop-out --resume   # continue at the first unfinished phase

Round N, from the previous round's policy (round 1: the plan's model):

    1. sample    K completions per prompt (`rlhfkit generate`)                     round-N/samples/
    2. label     preference pairs: a reward function, an AI judge (`rlhfkit ai-label`), or people
                 (a label-app import file; the loop stops until `rlhfkit label export`
                 has written the judgments, then `--resume` continues)              round-N/pairs/
    3. reward    `rlhfkit rm` on every round's pairs so far                         round-N/reward_model/
    4. optimise  `rlhfkit dpo`, `ppo` or `rejection-sampling` from the current policy  round-N/policy/
    5. evaluate  win rate over round 0's replies on held-out prompts, KL to round 0   round-N/eval/

Round 0's held-out replies are in round-0/eval/. Each phase writes ``done.json`` in its folder
atomically once its outputs are complete; ``--resume`` skips the finished phases (every phase after
the first one it runs is run again) and continues an interrupted training phase with the recipe's
own ``--resume``; a plan with more ``rounds`` continues a finished loop. The resolved plan is saved
as ``OUTPUT/config.yaml`` (with ``model`` and ``prompts`` at its top, so ``rlhfkit eval-frontier
--run OUTPUT --reward R`` draws reward vs KL over the rounds' policies), the figures as
``report.json`` and ``report.md``.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from rlhfkit.config import arg, validated
from rlhfkit.errors import InputError
from rlhfkit.evaluation.report import write_json, write_text
from rlhfkit.loop import phases
from rlhfkit.loop.phases import LabelsNeeded, Round
from rlhfkit.loop.plan import Plan, plan_dict, read_plan

MARKER = "done.json"


@dataclass
class Config:
    """Iterative RLHF in rounds: sample, label, reward model, optimise, evaluate; resumable at any phase."""

    plan: str = arg("", "The plan: a YAML file of the rounds and each phase's settings (docs/loop.md).")
    output: str = arg("", "Output folder: config.yaml (the resolved plan), round-N/ per round, report.md, report.json.")
    resume: bool = arg(False, "Continue the loop in --output at its first unfinished phase.")

    def validate(self) -> list[str]:
        problems = [] if self.output else ["--output is required"]
        if not self.plan:
            return problems + ["--plan is required"]
        try:
            plan = read_plan(self.plan)
        except InputError as e:
            return problems + e.problems
        if self.output:
            problems += self.output_problems(plan)
        return problems

    def output_problems(self, plan: Plan) -> list[str]:
        out = Path(self.output)
        saved = out / "config.yaml"
        if not self.resume:
            started = sorted(p.parent.parent.name for p in out.glob(f"round-*/*/{MARKER}"))
            return [f"--output {out}: holds a loop already ({started[0]} has finished phases); continue it with "
                    "--resume or choose another folder"] if started else []
        if not saved.exists():
            return [f"--resume: {out} holds no loop (no config.yaml)"]
        before = yaml.safe_load(saved.read_text()) or {}
        # more rounds continue a finished loop (Llama 2 added its rounds as the data came in)
        changed = [key for key, value in plan_dict(plan).items() if before.get(key) != value
                   and not (key == "rounds" and value >= before.get(key, value + 1))]
        return [f"--resume: the plan differs from the loop's in {saved} ({', '.join(changed)}); resume with the "
                "same plan, or one with more rounds (or start a new --output)"] if changed else []


# ------------------------------------------------------------------ done-markers


def finished(folder: Path) -> dict | None:
    marker = folder / MARKER
    return json.loads(marker.read_text()) if marker.exists() else None


@dataclass
class Progress:
    """Which phases this invocation skips: finished ones, until the first it runs (every later one runs).
    A marker holds the phase's summary and the seconds it took."""

    resume: bool
    running: bool = False          # a phase has run: later phases are redone even if marked finished

    def phase(self, folder: Path, work: Callable[[bool], dict]) -> dict:
        """The phase's summary: its marker's when finished, else ``work(resume)`` saved as its marker.
        ``resume``: the first phase this invocation runs continues its interrupted run."""
        done = finished(folder)
        if done is not None and not self.running:
            return done
        first = not self.running
        self.running = True
        folder.mkdir(parents=True, exist_ok=True)
        started = time.time()
        result = work(self.resume and first)
        write_json(folder / MARKER, {**result, "seconds": round(time.time() - started, 1)})
        return finished(folder)  # as a later --resume reads it


# ------------------------------------------------------------------ the loop


def run_round(plan: Plan, out: Path, index: int, policy: str, progress: Progress, round0: dict,
              earlier_pairs: list[str], previous_rm: str | None) -> dict[str, dict]:
    """Phases 1-5 of round ``index`` from ``policy``; each phase's summary by phase name."""
    folder = out / f"round-{index}"

    def at(name: str, work: Callable[[Round], dict]) -> dict:
        return progress.phase(folder / name, lambda resume: work(Round(index, folder, policy, out, resume)))

    samples = at("samples", lambda rnd: phases.sample(plan, rnd))
    pairs = at("pairs", lambda rnd: phases.label(plan, rnd, samples, earlier_pairs))
    rm = at("reward_model", lambda rnd: phases.reward_model(plan, rnd, pairs, previous_rm)) \
        if plan.reward_model.train else None
    trained = at("policy", lambda rnd: phases.optimise(plan, rnd, pairs, rm))
    evaluation = at("eval", lambda rnd: phases.evaluate(plan, rnd, trained["path"], round0))
    return {"samples": samples, "pairs": pairs, "reward_model": rm, "policy": trained, "eval": evaluation}


def run_loop(plan: Plan, out: Path, progress: Progress) -> tuple[dict, list[dict]]:
    """Round 0's evaluation, then every round: the report's baseline and its points, one per round."""
    round0 = progress.phase(out / "round-0" / "eval", lambda _: phases.baseline(plan, out / "round-0" / "eval"))
    points, policy, pair_files, rm_path = [], plan.model, [], None
    for index in range(1, plan.rounds + 1):
        done = run_round(plan, out, index, policy, progress, round0, pair_files, rm_path)
        pair_files.append(done["pairs"]["file"])
        rm_path = done["reward_model"]["path"] if done["reward_model"] else None
        policy = done["policy"]["path"]
        points.append(point(done["eval"], done))
        print(f"[loop] round {index}: score {points[-1]['score']:.4f}, win rate over round 0 "
              f"{100 * points[-1]['win_rate']:.1f}%, KL {points[-1]['kl']:.3f} nats", flush=True)
    return point(round0, None), points


def point(evaluation: dict, done: dict | None) -> dict:
    """One row of the report: the evaluation's figures, and the round's pairs and reward-model accuracy."""
    row = {key: evaluation[key] for key in ("round", "score", "win_rate", "win_rate_stderr", "kl", "mean_words",
                                            "policy", "judge_win_rate", "judge_win_rate_stderr") if key in evaluation}
    if done is not None:
        row.update(pairs=done["pairs"]["pairs"], cumulative_pairs=done["pairs"]["cumulative_pairs"],
                   sample_score=done["samples"]["mean_score"])
        rm_metrics = (done["reward_model"] or {}).get("metrics", {})
        row["rm_train_accuracy"] = rm_metrics.get("train/accuracy")
    return row


def write_report(plan: Plan, out: Path, baseline: dict, points: list[dict]) -> None:
    from rlhfkit.evaluation.report import md_table

    write_json(out / "report.json", {"plan": str(out / "config.yaml"), "eval_reward": plan.eval_reward,
                                     "held_out_prompts": len(phases.held_out(plan)), "baseline": baseline,
                                     "points": points})
    def percent(p: dict, key: str) -> str:
        return f"{100 * p[key]:.1f} ± {100 * p[key + '_stderr']:.1f}" if key in p else "50.0"

    judged = bool(plan.evaluate.judge)
    rows = [[p["round"], f"{p['score']:.4f}", percent(p, "win_rate"), f"{p['kl']:.3f}", p.get("pairs", ""),
             f"{p['mean_words']:.1f}"] + ([percent(p, "judge_win_rate")] if judged else [])
            for p in [baseline, *points]]
    header = ["round", "score", "win rate over round 0 (%)", "KL to round 0 (nats)", "pairs", "words"]
    table = md_table(header + (["judge's win rate over round 0 (%)"] if judged else []), rows, ["r"] * len(rows[0]))
    write_text(out / "report.md", f"# rlhfkit loop: {plan.rounds} rounds of {plan.optimise.method} from {plan.model}"
                                  f"\n\nHeld-out prompts scored by `{plan.eval_reward}`; round 0 is the starting "
                                  f"policy.\n\n{table}\n")


def main(cfg: Config) -> int:
    validated(cfg)
    plan, out = read_plan(cfg.plan), Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "config.yaml", yaml.safe_dump(plan_dict(plan), sort_keys=False))
    progress = Progress(cfg.resume)
    try:
        baseline, points = run_loop(plan, out, progress)
    except LabelsNeeded as e:
        print(e, file=sys.stderr)
        return 0
    write_report(plan, out, baseline, points)
    print(f"[loop] {plan.rounds} rounds: {out / 'report.md'}", flush=True)
    return 0
