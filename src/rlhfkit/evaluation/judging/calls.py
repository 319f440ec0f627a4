"""Judge calls: one request per verdict, sent in chunks, every reply parsed and streamed to disk.

Every mode turns (questions, answers, candidates) into a list of :class:`Call` and summarises
the :class:`Judged` replies; what happens in between is the same for all of them and lives here,
with the judge-reliability counts (:func:`judge_health`) that every report ends with.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from rlhfkit.evaluation.judging.data import Question
from rlhfkit.evaluation.judging.parsing import Parsed, parse_pairwise, parse_pass_fail, parse_rating
from rlhfkit.evaluation.report import JsonlWriter
from rlhfkit.models.backends import BackendError, JudgeBackend

CHUNK = 32  # judge calls per backend request batch (and per progress line)

# The verdict each kind of call asks for, and how to read it.
PARSERS: dict[str, Callable[[str], Parsed]] = {
    "single": parse_rating, "pairwise": parse_pairwise, "chat-bench": parse_pass_fail}


@dataclass
class Call:
    """One request to the judge: what kind of verdict, about what, and the prompt."""

    kind: str                   # a key of PARSERS: "single" | "pairwise" | "chat-bench"
    meta: dict[str, Any]        # question_id, category, turn, model(s), game
    messages: list[dict[str, str]]


@dataclass
class Judged:
    call: Call
    text: str
    parsed: Parsed


def backend_name(backend: JudgeBackend) -> str:
    return getattr(backend, "name", type(backend).__name__)


def execute(judge: JudgeBackend, calls: Sequence[Call], temperature: float = 0.0,
            max_tokens: int = 512, sink: JsonlWriter | None = None,
            log: Callable[[str], None] | None = None) -> list[Judged]:
    """Send the calls to the judge in chunks, parse every reply, stream raw records to ``sink``.

    A malformed verdict is kept (``parsed.value is None``) and never raises.
    """
    judge_name = backend_name(judge)
    results: list[Judged] = []
    for start in range(0, len(calls), CHUNK):
        chunk = list(calls[start:start + CHUNK])
        texts = judge.complete([c.messages for c in chunk], temperature=temperature,
                               max_tokens=max_tokens)
        if len(texts) != len(chunk):
            raise BackendError(f"judge {judge_name!r} returned {len(texts)} replies for "
                               f"{len(chunk)} prompts")
        for call, text in zip(chunk, texts):
            text = text if isinstance(text, str) else ""
            parsed = PARSERS[call.kind](text)
            results.append(Judged(call, text, parsed))
            if sink is not None:
                sink.write({"kind": call.kind, **call.meta, "judge": judge_name,
                            "verdict": parsed.value, "parse": parsed.pattern,
                            "problem": parsed.problem, "judgment": text,
                            "messages": call.messages})
        if log:
            log(f"judged {len(results)}/{len(calls)}")
    return results


def available_turns(replies: dict[str, list[str]], q: Question) -> int:
    """How many of ``q``'s turns a candidate answered (0 when it has no answer)."""
    return min(len(replies.get(q.key, [])), len(q.turns))


def has_reference(q: Question, turn: int) -> bool:
    """Whether ``q`` has a reference answer for ``turn`` (1-based): the grading is then reference-guided."""
    return bool(q.reference) and turn - 1 < len(q.reference) and bool(q.reference[turn - 1])


def mean_or_nan(xs: Sequence[float]) -> float:
    """The mean; NaN for no values (written as ``null`` in results.json, ``—`` in the report)."""
    return sum(xs) / len(xs) if xs else float("nan")


@dataclass
class JudgeHealth:
    """How well the judge kept to the verdict format, over all its judgments."""

    judgments: int
    malformed: int                      # no verdict could be read (excluded from every summary)
    malformed_rate: float | None        # None when there were no judgments
    lenient_parses: int                 # read by a fallback pattern, not the requested [[...]] form
    malformed_reasons: dict[str, int]   # parser's reason -> count

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def judge_health(judged: Sequence[Judged]) -> JudgeHealth:
    n = len(judged)
    malformed = sum(not j.parsed.ok for j in judged)
    lenient = sum(j.parsed.ok and not j.parsed.strict for j in judged)
    problems: dict[str, int] = defaultdict(int)
    for j in judged:
        if not j.parsed.ok:
            problems[j.parsed.problem or "malformed"] += 1
    return JudgeHealth(judgments=n, malformed=malformed, malformed_rate=malformed / n if n else None,
                       lenient_parses=lenient, malformed_reasons=dict(problems))
