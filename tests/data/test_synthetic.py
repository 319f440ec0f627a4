"""Step-level data: the stepwise-supervision schema and the synthetic arithmetic chains."""

from __future__ import annotations

import json
import random
import re

import pytest

from core_helpers import write_jsonl
from rlhfkit.data.schema import load_stepwise
from rlhfkit.data.synthetic import (
    OPERATIONS,
    Problem,
    arithmetic_chains,
    final_answer,
    main,
    make_problem,
    noisy_solutions,
    solve,
)
from rlhfkit.errors import InputError

STEP = re.compile(r"^(-?\d+) ([+*-]) (\d+) = (-?\d+)$")


def step_is_right(step: str) -> bool:
    a, op, x, result = STEP.match(step).groups()
    return OPERATIONS[op][1](int(a), int(x)) == int(result)


def test_a_problem_reads_as_its_operations_and_has_their_answer():
    problem = Problem(7, (("+", 5), ("*", 3), ("-", 4)))
    assert problem.prompt == "Start with 7, add 5, multiply by 3, then subtract 4. What is the result?"
    assert problem.answer == 32
    assert solve(problem, {}, random.Random(0)) == (["7 + 5 = 12", "12 * 3 = 36", "36 - 4 = 32"],
                                                    [True, True, True], 32)


def operands(step: str) -> tuple[int, int]:
    a, _, _, result = STEP.match(step).groups()
    return int(a), int(result)


def test_a_slip_makes_that_step_and_every_later_one_wrong():
    problem = Problem(7, (("+", 5), ("*", 3), ("-", 4), ("+", 1)))
    steps, labels, value = solve(problem, {1: "slip"}, random.Random(3))
    assert labels == [True, False, False, False]
    assert [step_is_right(s) for s in steps] == [True, False, True, True]  # later steps compute from the slip
    assert operands(steps[2])[0] == operands(steps[1])[1]  # ... carrying the wrong value forward
    assert abs(operands(steps[1])[1] - 36) in (1, 2, 10)
    assert value != problem.answer and final_answer("\n".join(steps)) == value


def test_a_copy_error_starts_from_a_miscopied_value_and_computes_right():
    problem = Problem(7, (("+", 5), ("*", 3), ("-", 4)))
    steps, labels, value = solve(problem, {1: "copy"}, random.Random(0))
    assert labels == [True, False, False]
    assert all(step_is_right(s) for s in steps)  # every step's arithmetic is right...
    assert abs(operands(steps[1])[0] - 12) in (1, 2, 10)  # ... but step 1 does not start from 12
    assert operands(steps[2])[0] == operands(steps[1])[1] and value != 32
    first, _, _ = solve(problem, {0: "copy"}, random.Random(0))
    assert abs(operands(first[0])[0] - 7) in (1, 2, 10)  # the first step miscopies the start value
    with pytest.raises(ValueError, match="unknown error kind"):
        solve(problem, {0: "typo"}, random.Random(0))


def test_chains_have_the_chosen_fraction_correct_and_one_slip_in_the_others():
    rows = arithmetic_chains(200, seed=5, correct_fraction=0.3, min_steps=2, max_steps=6)
    assert sum(all(r["labels"]) for r in rows) == 60
    lengths = {len(r["completions"]) for r in rows}
    assert lengths == {2, 3, 4, 5, 6}
    first_errors, kinds = set(), []
    for r in rows:
        assert len(r["labels"]) == len(r["completions"])
        right = [step_is_right(s) for s in r["completions"]]
        if all(r["labels"]):
            assert all(right) and final_answer(r["completions"][-1]) == r["answer"]
            continue
        first = r["labels"].index(False)
        first_errors.add(first)
        assert r["labels"] == [i < first for i in range(len(r["labels"]))]  # wrong from the error onward
        (kind,) = r["errors"].values()
        assert r["errors"] == {str(first): kind}
        kinds.append(kind)
        if kind == "slip":  # exactly one wrong computation, at the first wrong step
            assert right == [i != first for i in range(len(right))]
        else:  # every computation right, the first wrong step starting from a wrong value
            assert all(right)
        assert final_answer(r["completions"][-1]) != r["answer"]
    assert first_errors == {0, 1, 2, 3, 4, 5}
    assert 50 < kinds.count("slip") < 90 and kinds.count("slip") + kinds.count("copy") == 140
    correct = [s for r in rows if all(r["labels"]) for s in r["completions"]]
    assert all(0 <= int(n) < 1000 for s in correct for n in re.findall(r"-?\d+", s))


def test_chains_are_seeded():
    assert arithmetic_chains(20, seed=1) == arithmetic_chains(20, seed=1)
    assert arithmetic_chains(20, seed=1) != arithmetic_chains(20, seed=2)
    assert [all(r["labels"]) for r in arithmetic_chains(10, correct_fraction=1.0)] == [True] * 10
    assert not any(all(r["labels"]) for r in arithmetic_chains(10, correct_fraction=0.0))
    only_slips = arithmetic_chains(30, correct_fraction=0.0, error_kinds=("slip",))
    assert {k for r in only_slips for k in r["errors"].values()} == {"slip"}
    with pytest.raises(ValueError, match="correct_fraction"):
        arithmetic_chains(3, correct_fraction=1.5)


def test_the_noisy_solver_slips_at_its_rate():
    """2 000 solutions of 4 steps at a step error rate of 0.2: P(correct chain) = 0.8^4 = 0.4096 (the
    standard error of the observed fraction is 0.011); half of the errors slips, half copy errors."""
    rng = random.Random(0)
    problem = make_problem(rng, 4)
    rows = noisy_solutions(problem, 2000, 0.2, rng)
    correct = sum(all(r["labels"]) for r in rows) / len(rows)
    assert abs(correct - 0.4096) < 0.045
    errors = sum(len(r["errors"]) for r in rows) / (4 * len(rows))
    assert abs(errors - 0.2) < 0.02
    slips = sum(not step_is_right(s) for r in rows for s in r["completions"]) / (4 * len(rows))
    assert abs(slips - 0.1) < 0.015  # half of the errors are slips
    # a correct chain reaches the answer; a wrong one almost never does (two slips may cancel out)
    assert all(final_answer(r["completions"][-1]) == problem.answer for r in rows if all(r["labels"]))
    lucky = [r for r in rows if not all(r["labels"]) and final_answer(r["completions"][-1]) == problem.answer]
    assert len(lucky) < 0.05 * len(rows)
    assert all(all(r["labels"]) for r in noisy_solutions(problem, 5, 0.0, rng))


def test_final_answer_is_the_number_after_the_last_equals_sign():
    assert final_answer("7 + 5 = 12\n12 * 3 = 36") == 36
    assert final_answer("so the result = -4.") == -4
    assert final_answer("no answer here") is None


def test_the_command_line_writes_chains_the_schema_accepts(tmp_path, capsys):
    out = tmp_path / "chains.jsonl"
    assert main(["--output", str(out), "--n", "12", "--seed", "3", "--correct-fraction", "0.25"]) == 0
    assert "12 chains (3 correct" in capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == arithmetic_chains(12, seed=3, correct_fraction=0.25)
    examples = load_stepwise(str(out))
    assert [e.steps for e in examples] == [r["completions"] for r in rows]
    assert main(["--output", str(out), "--n", "0", "--min-steps", "4", "--max-steps", "3"]) == 2
    err = capsys.readouterr().err
    assert "error: --n must be >= 1 (got 0)" in err and "--min-steps and --max-steps" in err


def test_the_schema_names_file_line_and_field(tmp_path):
    path = write_jsonl(tmp_path / "steps.jsonl", [
        {"prompt": "p", "completions": ["a", "b"], "labels": [True, False]},
        {"prompt": "p", "completions": ["a", "b", "c"], "labels": [True, False]},
        {"prompt": "", "completions": ["a"], "labels": [1]},
        {"prompt": "p", "completions": "a", "labels": [True]},
        {"prompt": "p", "completions": ["a"], "labels": None},
    ])
    with pytest.raises(InputError) as e:
        load_stepwise(path)
    assert e.value.problems == [
        f"{path}:2: field 'labels': 2 label(s) for 3 step(s): expected one per step",
        f"{path}:3: field 'prompt': is empty",
        f"{path}:3: field 'labels[0]': expected true or false, got 1",
        f"{path}:4: field 'completions': expected a non-empty list of steps (strings)",
        f"{path}:5: field 'labels': expected a list of true/false, one per step",
    ]
    ok = load_stepwise(write_jsonl(tmp_path / "ok.jsonl", [{"prompt": [{"role": "user", "content": "q"}],
                                                            "completions": ["a"], "labels": [True]}]))
    assert ok[0].prompt == [{"role": "user", "content": "q"}] and ok[0].labels == [True]
