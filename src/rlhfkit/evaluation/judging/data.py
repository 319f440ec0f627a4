"""Question sets and candidate answers for ``rlhfkit judge``.

**Questions** (MT-Bench's ``question.jsonl`` format, one JSON object per line)::

    {"question_id": 81, "category": "writing", "turns": ["first question", "follow-up"],
     "reference": ["reference answer to turn 1", "... to turn 2"]}      # reference optional

Chat-bench scripts use the same shape plus one requirement per turn and an optional system
prompt::

    {"question_id": "cb-memory", "category": "memory", "turns": ["...", "..."],
     "checks": ["what reply 1 must do", "what reply 2 must do"], "system": "..."}

Built-in sets (``--questions builtin`` picks the one for the mode): ``mt`` (20 two-turn
questions over writing, roleplay, reasoning, math, coding, extraction, STEM and humanities,
with reference answers for math, reasoning and a few others) and ``chat-bench`` (9 scripted
conversations).

**Answers** (JSONL, one record per question and model). Accepted shapes, first match wins::

    {"question_id": 81, "model_id": "m", "choices": [{"index": 0, "turns": ["a1", "a2"]}]}  # MT-Bench
    {"question_id": 81, "model": "m", "turns": ["a1", "a2"]}
    {"question_id": 81, "model": "m", "answer": "a1"}           # single turn (or a list)
    {"question_id": 81, "model": "m", "completions": ["a1", ...]}  # `rlhfkit generate`: first used

The model name is ``model_id``, else ``model``, else the file name without extension. When a
model answers the same question twice, the later record wins (as in MT-Bench's loader).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from rlhfkit.errors import InputError, record_problem
from rlhfkit.evaluation.report import cap_problems, read_json_records

BUILTIN_SETS = {"mt": "mt_two_turn.jsonl", "chat-bench": "chat_bench.jsonl"}
Answers = dict[str, dict[str, list[str]]]  # model -> question key -> its reply to each turn


@dataclass
class Question:
    question_id: Any                    # int or str, as given in the file
    category: str
    turns: list[str]
    reference: list[str | None] | None = None
    checks: list[str] | None = None     # chat-bench: the requirement for each reply
    system: str | None = None

    @property
    def key(self) -> str:
        return str(self.question_id)


def builtin_path(name: str) -> Path:
    """The file of a built-in question set (``mt`` or ``chat-bench``)."""
    if name not in BUILTIN_SETS:
        raise InputError(f"unknown built-in question set {name!r} (choose from "
                         f"{', '.join(BUILTIN_SETS)})")
    return Path(str(resources.files("rlhfkit.evaluation").joinpath("questions", BUILTIN_SETS[name])))


def _is_str_list(value: Any, allow_none: bool = False) -> bool:
    return isinstance(value, list) and all(
        isinstance(v, str) or (allow_none and v is None) for v in value)


def load_questions(path: str | Path, require_checks: bool = False) -> list[Question]:
    """Read and validate a question file; problems name ``file:line: field``."""
    src = str(path)
    problems: list[str] = []
    questions: list[Question] = []
    seen: dict[str, int] = {}
    for line, rec in read_json_records(path):
        def bad(fld: str | None, msg: str, line: int = line) -> None:
            problems.append(record_problem(src, line, fld, msg))

        if not isinstance(rec, dict):
            bad(None, f"expected an object, got {type(rec).__name__}")
            continue
        ok = True
        qid = rec.get("question_id")
        if "question_id" not in rec:
            bad("question_id", "missing")
            ok = False
        elif isinstance(qid, bool) or not isinstance(qid, (int, str)) or qid == "":
            bad("question_id", f"expected an integer or a non-empty string, got {qid!r}")
            ok = False
        elif str(qid) in seen:
            bad("question_id", f"duplicate id {qid!r} (first at line {seen[str(qid)]})")
            ok = False
        else:
            seen[str(qid)] = line
        turns = rec.get("turns")
        if not _is_str_list(turns) or not turns or not all(t.strip() for t in turns):
            bad("turns", "expected a non-empty list of non-empty strings")
            ok = False
        category = rec.get("category", "general")
        if not isinstance(category, str):
            bad("category", f"expected a string, got {category!r}")
            ok = False
        reference = rec.get("reference")
        if isinstance(reference, str):
            reference = [reference]
        if reference is not None and not _is_str_list(reference, allow_none=True):
            bad("reference", "expected a list of strings (one per turn)")
            ok = False
        checks = rec.get("checks")
        if checks is not None or require_checks:
            if not _is_str_list(checks) or not isinstance(turns, list) or len(checks) != len(turns):
                bad("checks", "expected a list of strings, one requirement per turn")
                ok = False
        system = rec.get("system")
        if system is not None and not isinstance(system, str):
            bad("system", f"expected a string, got {system!r}")
            ok = False
        if ok:
            questions.append(Question(qid, category or "general", list(turns),
                                      list(reference) if reference else None,
                                      list(checks) if checks else None, system))
    if problems:
        raise InputError(cap_problems(problems))
    if not questions:
        raise InputError(f"{src}: no questions")
    return questions


def _answer_turns(rec: dict) -> tuple[list[str] | None, str | None]:
    """(turns, field) from one answer record, or (None, problem field)."""
    if "choices" in rec:
        choices = rec["choices"]
        if (isinstance(choices, list) and choices and isinstance(choices[0], dict)
                and _is_str_list(choices[0].get("turns")) and choices[0]["turns"]):
            return list(choices[0]["turns"]), None
        return None, "choices"
    if "turns" in rec:
        return (list(rec["turns"]), None) if _is_str_list(rec["turns"]) and rec["turns"] else (None, "turns")
    if "answer" in rec:
        a = rec["answer"]
        if isinstance(a, str):
            return [a], None
        return (list(a), None) if _is_str_list(a) and a else (None, "answer")
    if "completions" in rec:
        c = rec["completions"]
        return ([c[0]], None) if _is_str_list(c) and c else (None, "completions")
    return None, "choices"


def load_answers(paths: list[str]) -> Answers:
    """``{model: {question key: [reply per turn]}}`` from answer files (format above)."""
    answers: dict[str, dict[str, list[str]]] = {}
    problems: list[str] = []
    for path in paths:
        src = str(path)
        default_model = Path(path).stem
        for line, rec in read_json_records(path):
            if not isinstance(rec, dict):
                problems.append(record_problem(src, line, None,
                                               f"expected an object, got {type(rec).__name__}"))
                continue
            qid = rec.get("question_id")
            if "question_id" not in rec:
                problems.append(record_problem(src, line, "question_id", "missing"))
                continue
            if isinstance(qid, bool) or not isinstance(qid, (int, str)):
                problems.append(record_problem(src, line, "question_id",
                                               f"expected an integer or a string, got {qid!r}"))
                continue
            model = rec.get("model_id", rec.get("model", default_model))
            if not isinstance(model, str) or not model.strip():
                fld = "model_id" if "model_id" in rec else "model"
                problems.append(record_problem(src, line, fld,
                                               f"expected a non-empty string, got {model!r}"))
                continue
            turns, fld = _answer_turns(rec)
            if turns is None:
                problems.append(record_problem(
                    src, line, fld, "expected the answer as choices[0].turns, turns (list of "
                    "strings), answer (string) or completions (list of strings)"))
                continue
            answers.setdefault(model, {})[str(qid)] = turns
    if problems:
        raise InputError(cap_problems(problems))
    return answers


def answer_records(model: str, questions: list[Question],
                   replies: dict[str, list[str]]) -> list[dict]:
    """Answers as MT-Bench-style records (what ``answers/MODEL.jsonl`` holds)."""
    return [{"question_id": q.question_id, "model_id": model,
             "choices": [{"index": 0, "turns": replies[q.key]}]}
            for q in questions if q.key in replies]
