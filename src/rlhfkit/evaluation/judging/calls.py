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
from rlhfkit.models.backends import BackendError, JudgeBackend, ReplyJournal, journaled_replies, request_key, reseeded

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


def call_key(judge_name: str, call: Call, temperature: float, max_tokens: int) -> str:
    """The journal key of one judge request: the judge, what is judged (ids, models, game, repeat),
    the prompt and the sampling settings; any change sends the request again."""
    return request_key("judge", judge_name, call.kind, call.meta, call.messages, temperature, max_tokens)


def with_repeats(calls: Sequence[Call], repeats: int) -> list[Call]:
    """Each call ``repeats`` times, one round after another, the round in ``meta["repeat"]``
    (0-based; absent when ``repeats`` is 1, so a plain run's keys and records are unchanged)."""
    if repeats == 1:
        return list(calls)
    return [Call(c.kind, {**c.meta, "repeat": r}, c.messages) for r in range(repeats) for c in calls]


def _ask(judge: JudgeBackend, chunk: Sequence[Call], temperature: float, max_tokens: int,
         journal: ReplyJournal | None) -> list[str]:
    """The judge's replies to one chunk; with a journal, only the calls it lacks are sent, and a
    repeat goes to :func:`reseeded` ``judge`` so that a local judge draws a fresh sample."""
    if journal is None:
        return judge.complete([c.messages for c in chunk], temperature=temperature, max_tokens=max_tokens)
    name = backend_name(judge)
    texts: dict[int, str] = {}
    for r in sorted({c.meta.get("repeat", 0) for c in chunk}):
        idx = [i for i, c in enumerate(chunk) if c.meta.get("repeat", 0) == r]
        keys = [call_key(name, chunk[i], temperature, max_tokens) for i in idx]
        try:
            got = journaled_replies(reseeded(judge, r), [chunk[i].messages for i in idx], keys, journal,
                                    temperature, max_tokens)
        except (KeyError, IndexError):  # the backend returned fewer (or more) replies than prompts
            raise BackendError(f"judge {name!r} did not return one reply per prompt") from None
        texts.update(zip(idx, (g.text for g in got)))
    return [texts[i] for i in range(len(chunk))]


def execute(judge: JudgeBackend, calls: Sequence[Call], temperature: float = 0.0,
            max_tokens: int = 512, sink: JsonlWriter | None = None,
            log: Callable[[str], None] | None = None, journal: ReplyJournal | None = None) -> list[Judged]:
    """Send the calls to the judge in chunks, parse every reply, stream raw records to ``sink``.

    With a ``journal`` (:class:`~rlhfkit.models.backends.ReplyJournal`) every reply is recorded as it
    arrives under :func:`call_key`, and a resumed run sends only the calls with no reply yet.
    A malformed verdict is kept (``parsed.value is None``) and never raises.
    """
    judge_name = backend_name(judge)
    results: list[Judged] = []
    for start in range(0, len(calls), CHUNK):
        chunk = list(calls[start:start + CHUNK])
        texts = _ask(judge, chunk, temperature, max_tokens, journal)
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
