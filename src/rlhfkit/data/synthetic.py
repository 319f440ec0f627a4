"""Synthetic step-level data: multi-step arithmetic chains with injected errors.

A problem starts from a number and applies a few operations; its solution writes one step per
operation (``7 + 5 = 12``, then ``12 * 3 = 36``, ...) and its answer is the last result::

    prompt: "Start with 7, add 5, multiply by 3, then subtract 4. What is the result?"
    steps:  ["7 + 5 = 12", "12 * 3 = 36", "36 - 4 = 32"]

An *error* in a step is one of two kinds, both off by 1, 2 or 10 (a dropped carry):

- ``slip``: the arithmetic is wrong: ``12 * 3 = 35``;
- ``copy``: the step starts from a miscopied value (the previous result, or the start value for
  the first step) and computes correctly from it: ``12 * 3 = 36`` then ``35 - 4 = 31``.

Every later step computes correctly from the wrong value, as a real solver carries its mistake
forward. Labels follow Math-Shepherd and PRM800K: a step is correct while the chain is still
correct, so the first wrong step and every step after it are labelled false.

- :func:`arithmetic_chains`: labelled records ``{prompt, completions, labels, answer}`` (TRL's
  stepwise-supervision format, plus the true answer and where the error is), a chosen fraction of
  them correct and the others with one error, of a drawn kind at a uniformly drawn step; seeded.
- :func:`noisy_solutions`: the bench's "noisy solver": N solutions of one problem in which every
  step errs independently with a given probability (several errors per chain are possible).
- :func:`final_answer`: the answer a solution text states (the number after its last ``=``).

From the command line (the records of :func:`arithmetic_chains`, one JSON object per line)::

    python -m rlhfkit.data.synthetic --output chains.jsonl --n 2000 --seed 0 [--correct-fraction 0.5]
"""

from __future__ import annotations

import random
import re
import sys
from dataclasses import dataclass

from rlhfkit.config import arg

OPERATIONS = {"+": ("add", lambda a, b: a + b), "-": ("subtract", lambda a, b: a - b),
              "*": ("multiply by", lambda a, b: a * b)}
OFFSETS = (1, 2, 10)  # how far a wrong number is from the true one (off by one, by two, a dropped carry)
ERROR_KINDS = ("slip", "copy")
ANSWER = re.compile(r"=\s*(-?\d+)")


@dataclass(frozen=True)
class Problem:
    """A start value and the operations applied to it in order: ``(("+", 5), ("*", 3), ...)``."""

    start: int
    operations: tuple[tuple[str, int], ...]

    @property
    def prompt(self) -> str:
        words = [f"{OPERATIONS[op][0]} {x}" for op, x in self.operations]
        chain = ", ".join(words[:-1]) + f", then {words[-1]}" if len(words) > 1 else words[0]
        return f"Start with {self.start}, {chain}. What is the result?"

    @property
    def answer(self) -> int:
        value = self.start
        for op, x in self.operations:
            value = OPERATIONS[op][1](value, x)
        return value


def make_problem(rng: random.Random, num_steps: int) -> Problem:
    """A problem of ``num_steps`` operations whose true intermediate results stay in 0..999:
    additions and subtractions of 1..20, multiplications by 2..4."""
    value = rng.randint(2, 20)
    start, operations = value, []
    for _ in range(num_steps):
        choices = ["+"] + (["-"] if value > 1 else []) + (["*"] if value <= 99 else [])
        op = rng.choice(choices)
        x = rng.randint(2, 4) if op == "*" else rng.randint(1, min(20, value - 1) if op == "-" else 20)
        operations.append((op, x))
        value = OPERATIONS[op][1](value, x)
    return Problem(start, tuple(operations))


def near(rng: random.Random, value: int) -> int:
    """A wrong number near ``value``: off by 1, 2 or 10 either way, never negative."""
    options = [value + d for d in OFFSETS] + [value - d for d in OFFSETS if value - d >= 0]
    return rng.choice(options)


def solve(problem: Problem, errors: dict[int, str], rng: random.Random) -> tuple[list[str], list[bool], int]:
    """(steps, labels, final value) of a solution that errs at the steps in ``errors`` (step index
    -> kind, :data:`ERROR_KINDS`) and computes every step from the value it was given (its own
    earlier errors included). A step's label is True while no step so far has erred."""
    steps, labels, value, still_correct = [], [], problem.start, True
    for i, (op, x) in enumerate(problem.operations):
        kind = errors.get(i)
        if kind == "copy":
            value = near(rng, value)
        result = OPERATIONS[op][1](value, x)
        if kind == "slip":
            result = near(rng, result)
        elif kind is not None and kind != "copy":
            raise ValueError(f"unknown error kind {kind!r} (expected one of {', '.join(ERROR_KINDS)})")
        still_correct = still_correct and kind is None
        steps.append(f"{value} {op} {x} = {result}")
        labels.append(still_correct)
        value = result
    return steps, labels, value


def record(problem: Problem, steps: list[str], labels: list[bool], errors: dict[int, str]) -> dict:
    """TRL's stepwise-supervision record plus the true answer and the errors (step index -> kind)."""
    return {"prompt": problem.prompt, "completions": steps, "labels": labels, "answer": problem.answer,
            "errors": {str(i): kind for i, kind in sorted(errors.items())}}


def arithmetic_chains(n: int, seed: int = 0, correct_fraction: float = 0.5, min_steps: int = 3,
                      max_steps: int = 5, error_kinds: tuple[str, ...] = ERROR_KINDS) -> list[dict]:
    """``n`` labelled chains of ``min_steps..max_steps`` steps: a ``correct_fraction`` of them
    (rounded; which ones is drawn) correct, each other one with a single error of a kind drawn
    from ``error_kinds`` at a uniformly drawn step."""
    if not 0 <= correct_fraction <= 1:
        raise ValueError(f"correct_fraction must be in [0, 1] (got {correct_fraction})")
    # salted: a bare Random(seed) would draw the correct chains in the order in which Random(seed).shuffle
    # orders n items, so a reader shuffling with the same seed would see every wrong chain first
    rng = random.Random(f"rlhfkit.data.synthetic:{seed}")
    correct = set(rng.sample(range(n), round(n * correct_fraction)))
    out = []
    for i in range(n):
        problem = make_problem(rng, rng.randint(min_steps, max_steps))
        errors = {} if i in correct else {rng.randrange(len(problem.operations)): rng.choice(error_kinds)}
        steps, labels, _ = solve(problem, errors, rng)
        out.append(record(problem, steps, labels, errors))
    return out


def noisy_solutions(problem: Problem, n: int, step_error_rate: float, rng: random.Random,
                    error_kinds: tuple[str, ...] = ERROR_KINDS) -> list[dict]:
    """``n`` solutions of ``problem`` by a solver that errs at each step independently with
    probability ``step_error_rate`` (the kind drawn from ``error_kinds``); records as
    :func:`arithmetic_chains` writes them."""
    out = []
    for _ in range(n):
        errors = {i: rng.choice(error_kinds) for i in range(len(problem.operations)) if rng.random() < step_error_rate}
        steps, labels, _ = solve(problem, errors, rng)
        out.append(record(problem, steps, labels, errors))
    return out


def final_answer(text: str) -> int | None:
    """The answer a solution states: the number after its last ``=`` (None when there is none)."""
    found = ANSWER.findall(text)
    return int(found[-1]) if found else None


# ------------------------------------------------------------------------------------ command line


@dataclass
class Config:
    """Write labelled arithmetic chains (TRL stepwise supervision) for `rlhfkit prm`."""

    output: str = arg("", "Output JSONL file.")
    n: int = arg(800, "Number of chains (the default trains `rlhfkit prm` to ~85% held-out step accuracy in "
                 "~10 CPU minutes; 400 gave 72%, barely above always answering correct, 68%).")
    seed: int = arg(0, "Random seed (the same seed writes the same file).")
    correct_fraction: float = arg(0.5, "Fraction of chains without an error.")
    min_steps: int = arg(3, "Fewest steps in a chain.")
    max_steps: int = arg(5, "Most steps in a chain.")

    def validate(self) -> list[str]:
        problems = [] if self.output else ["--output is required"]
        if self.n < 1:
            problems.append(f"--n must be >= 1 (got {self.n})")
        if not 0 <= self.correct_fraction <= 1:
            problems.append(f"--correct-fraction must be in [0, 1] (got {self.correct_fraction})")
        if not 1 <= self.min_steps <= self.max_steps:
            problems.append(f"--min-steps and --max-steps need 1 <= min <= max (got {self.min_steps}, "
                            f"{self.max_steps})")
        return problems


def main(argv: list[str] | None = None) -> int:
    import argparse

    from rlhfkit.config import add_config_arguments, build_config
    from rlhfkit.data.io import write_jsonl
    from rlhfkit.errors import InputError

    parser = argparse.ArgumentParser(prog="python -m rlhfkit.data.synthetic", description=Config.__doc__)
    add_config_arguments(parser, Config)
    values = vars(parser.parse_args(argv))
    try:
        cfg = build_config(Config, values, values.pop("__config_file", None))
    except InputError as e:
        for problem in e.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    rows = arithmetic_chains(cfg.n, cfg.seed, cfg.correct_fraction, cfg.min_steps, cfg.max_steps)
    write_jsonl(cfg.output, rows)
    wrong_steps = sum(not label for r in rows for label in r["labels"])
    print(f"synthetic: {len(rows)} chains ({sum(all(r['labels']) for r in rows)} correct, "
          f"{wrong_steps} wrong steps) -> {cfg.output}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
