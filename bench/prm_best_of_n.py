"""PRM-guided best-of-N against outcome-RM best-of-N, majority vote and a single sample, on the
synthetic arithmetic task (docs/prm.md has the results and the reasoning).

    OMP_NUM_THREADS=1 .venv/bin/python bench/prm_best_of_n.py [--output bench-out/prm] [--problems 100]

1. data: ``python -m rlhfkit.data.synthetic`` with its defaults for training (seed 0) and 200
   held-out chains (seed 1);
2. the PRM: ``rlhfkit prm`` with its default settings; the outcome reward model (ORM): the same
   command and data with ``--train-on-last-step-only`` (only each chain's final label, whether its
   answer is right, trains it; it scores a solution by its verdict on the last step);
3. where the candidates come from: SmolLM2-135M itself (2-shot, greedy) is checked on
   --solver-check problems first; it rarely solves them, so the candidates are 16 solutions per
   held-out problem from the "noisy solver" (every step errs independently with probability
   --error-rate: an arithmetic slip or a miscopied value, half and half);
4. for N = 1, 2, 4, 8, 16 the 16 candidates are cut into 16/N disjoint groups of N and each method
   picks one answer per group: the first candidate (single sample), the most frequent final answer
   (majority vote; ties go to the answer seen first), the answer with the largest sum of PRM scores
   (PRM-weighted vote, Math-Shepherd's), the highest ORM score, the highest PRM score (min or
   product over the steps); accuracy is the fraction of groups whose answer is right, over every
   group of every problem. ``pass@N`` (some candidate of the group is right) is the ceiling.

Prints a table, writes ``results.json`` under --output and the plot docs/prm_best_of_n.png.
One thread (OMP_NUM_THREADS=1) is the fastest on a busy 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NS = (1, 2, 4, 8, 16)
METHODS = ("single sample", "majority vote", "PRM-weighted vote", "ORM best-of-N", "PRM best-of-N (min)",
           "PRM best-of-N (prod)", "pass@N (ceiling)")


def train(out: Path) -> tuple[Path, Path]:
    """The PRM and the ORM, each with the command's default settings (the ORM: plus outcome-only
    labels), on the generator's default training chains."""
    from rlhfkit.cli import main as rlhfkit
    from rlhfkit.data.synthetic import main as synthetic

    data, held_out = str(out / "train.jsonl"), str(out / "eval.jsonl")
    for argv in (["--output", data, "--seed", "0"], ["--output", held_out, "--n", "200", "--seed", "1"]):
        print(f"$ python -m rlhfkit.data.synthetic {' '.join(argv)}", flush=True)
        synthetic(argv)
    for name, extra in {"prm": [], "orm": ["--train-on-last-step-only"]}.items():
        t0 = time.time()
        argv = ["prm", "--data", data, "--eval-data", held_out, "--output", str(out / name), "--no-progress", *extra]
        print(f"$ rlhfkit {' '.join(argv)}", flush=True)
        if rlhfkit(argv) != 0:
            sys.exit(f"rlhfkit prm failed for the {name}")
        print(f"  {name} trained and evaluated in {time.time() - t0:.0f} s", flush=True)
    return out / "prm", out / "orm"


def solver_check(num_problems: int) -> float:
    """The fraction of --solver-check problems SmolLM2-135M solves (2 solved examples in the
    prompt, greedy decoding, the answer after its last '=')."""
    from rlhfkit.data.synthetic import final_answer, make_problem, solve
    from rlhfkit.generation.decoding import SamplingParams, generate_chat
    from rlhfkit.models.loading import load_policy

    rng = random.Random(3)
    shots = [make_problem(rng, 3), make_problem(rng, 4)]
    intro = "Solve the problem step by step: one operation per line, as in the examples.\n\n"
    examples = "".join(f"Problem: {p.prompt}\n" + "\n".join(solve(p, {}, rng)[0]) + "\n\n" for p in shots)
    problems = [make_problem(rng, rng.randint(3, 5)) for _ in range(num_problems)]
    model, tokenizer = load_policy("smollm2-135m")
    replies = generate_chat(model, tokenizer, [f"{intro}{examples}Problem: {p.prompt}" for p in problems],
                            SamplingParams(strategy="greedy", max_new_tokens=64), batch_size=8)
    solved = [final_answer(r[0]) == p.answer for r, p in zip(replies, problems)]
    print(f"SmolLM2-135M, 2-shot greedy: {sum(solved)} of {num_problems} problems solved; e.g.\n"
          f"  {problems[0].prompt}\n  -> {replies[0][0]!r}", flush=True)
    return sum(solved) / num_problems


def candidates(args) -> list[tuple[object, list[dict]]]:
    """(problem, 16 noisy-solver solutions) for --problems held-out problems (seed 2)."""
    from rlhfkit.data.synthetic import make_problem, noisy_solutions

    rng = random.Random(2)
    out = []
    for _ in range(args.problems):
        problem = make_problem(rng, rng.randint(3, 5))
        out.append((problem, noisy_solutions(problem, max(NS), args.error_rate, rng)))
    return out


def step_probabilities(path: Path, chains: list[dict]) -> list[list[float]]:
    """The model's probability that each step of each chain is correct (identical chains scored once)."""
    import rlhfkit

    model = rlhfkit.load_prm(str(path))
    unique = list(dict.fromkeys((c["prompt"], tuple(c["completions"])) for c in chains))
    probs = model.score_steps([p for p, _ in unique], [list(steps) for _, steps in unique], batch_size=32)
    found = dict(zip(unique, probs))
    return [found[(c["prompt"], tuple(c["completions"]))] for c in chains]


def detection_by_kind(chains: list[dict], probs: list[list[float]]) -> dict[str, float]:
    """Per error kind: the fraction of wrong chains whose first wrong step the model rejects."""
    out = {}
    for kind in ("slip", "copy"):
        rows = [(p, int(min(c["errors"], key=int))) for c, p in zip(chains, probs)
                if c["errors"] and c["errors"][min(c["errors"], key=int)] == kind]
        out[kind] = sum(p[i] < 0.5 for p, i in rows) / max(len(rows), 1)
    return out


def pick(method: str, group: list[int], answers: list[int], prm: list[list[float]], orm: list[list[float]]) -> int:
    """The answer ``method`` picks among the candidates ``group`` (indices) of one problem."""
    import math

    if method == "single sample":
        return answers[group[0]]
    if method in ("majority vote", "PRM-weighted vote"):
        votes = Counter()
        for i in group:
            votes[answers[i]] += 1 if method == "majority vote" else min(prm[i])
        return max((answers[i] for i in group), key=lambda a: votes[a])  # max keeps the first of ties
    score = {"ORM best-of-N": lambda i: orm[i][-1], "PRM best-of-N (min)": lambda i: min(prm[i]),
             "PRM best-of-N (prod)": lambda i: math.prod(prm[i])}[method]
    return answers[max(group, key=score)]  # max keeps the first of ties


def accuracy_table(pool, prm_probs, orm_probs) -> dict[str, dict[int, float]]:
    from rlhfkit.data.synthetic import final_answer

    table = {m: {} for m in METHODS}
    for n in NS:
        hits = Counter()
        groups = 0
        for (problem, cands), prm, orm in zip(pool, prm_probs, orm_probs):
            answers = [final_answer(c["completions"][-1]) for c in cands]
            for start in range(0, max(NS), n):
                group = list(range(start, start + n))
                groups += 1
                for m in METHODS[:-1]:
                    hits[m] += pick(m, group, answers, prm, orm) == problem.answer
                hits[METHODS[-1]] += any(answers[i] == problem.answer for i in group)
        for m in METHODS:
            table[m][n] = hits[m] / groups
    return table


def plot(table, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for m in METHODS:
        style = dict(linestyle=":", color="grey") if m.startswith("pass@") else dict(marker="o")
        ax.plot(NS, [table[m][n] for n in NS], label=m, **style)
    ax.set_xscale("log", base=2)
    ax.set_xticks(NS, [str(n) for n in NS])
    ax.set_xlabel("N (candidate solutions per problem)")
    ax.set_ylabel("answer accuracy")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="bench-out/prm", help="Folder for the data, the two models, results.json.")
    parser.add_argument("--problems", type=int, default=100, help="Held-out problems, 16 candidates each.")
    parser.add_argument("--error-rate", type=float, default=0.2, help="The noisy solver's per-step error rate.")
    parser.add_argument("--solver-check", type=int, default=16, help="Problems SmolLM2 is asked first (0: skip).")
    parser.add_argument("--plot", default=str(REPO / "docs" / "prm_best_of_n.png"))
    args = parser.parse_args()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    solved = solver_check(args.solver_check) if args.solver_check else None
    prm_path, orm_path = train(out)
    held_out = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    pool = candidates(args)
    flat = [c for _, cands in pool for c in cands]
    results = {"smollm2_solved": solved, "args": vars(args)}
    probs = {}
    for name, path in (("prm", prm_path), ("orm", orm_path)):
        metrics = json.loads((path / "metrics.jsonl").read_text().splitlines()[-1])
        caught = detection_by_kind(held_out, step_probabilities(path, held_out))
        results[name] = {**{k: v for k, v in metrics.items() if k.startswith("eval/")}, "first_error_caught": caught}
        print(f"{name}: held-out step accuracy {metrics['eval/step_accuracy']:.3f} (always 'correct' "
              f"{metrics['eval/always_correct_accuracy']:.3f}), first-error accuracy "
              f"{metrics['eval/first_error_accuracy']:.3f}; first wrong step rejected: "
              + ", ".join(f"{k} {v:.2f}" for k, v in caught.items()), flush=True)
        scores = step_probabilities(path, flat)
        probs[name] = [scores[i * max(NS):(i + 1) * max(NS)] for i in range(len(pool))]
    table = accuracy_table(pool, probs["prm"], probs["orm"])
    results["table"] = table
    print(f"\n{args.problems} problems x 16 noisy-solver candidates (step error rate {args.error_rate}); "
          f"answer accuracy\n")
    print("| method | " + " | ".join(f"N={n}" for n in NS) + " |")
    print("|---|" + "---|" * len(NS))
    for m in METHODS:
        print(f"| {m} | " + " | ".join(f"{table[m][n]:.3f}" for n in NS) + " |")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plot(table, Path(args.plot), f"synthetic arithmetic, noisy solver (step error rate {args.error_rate}), "
                                 f"{args.problems} problems")
    print(f"\nplot: {args.plot}; total {time.time() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
