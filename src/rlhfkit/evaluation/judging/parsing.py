"""Reading verdicts out of a judge's free text, robustly.

Judges are asked to explain and then end with a bracketed verdict: ``[[7]]`` (single grading),
``[[A]]``/``[[B]]``/``[[C]]`` (pairwise), ``[[PASS]]``/``[[FAIL]]`` (chat-bench). Real judges,
small local ones especially, drift from the format, so each parser tries a strict pattern
first and then a short list of fallbacks, and reports which one matched. A verdict that
matches nothing, or a rating outside 1–10, is *malformed*: it is returned as ``None`` with the
reason, counted and reported by the caller, and never raises.

Rules common to all three parsers:

* a strict match anywhere beats any fallback match;
* for the strict pattern the **last** match wins (judges often quote the scale, "from [[1]]
  to [[10]]", or the answer under review before concluding);
* a fallback pattern counts only if all its matches agree (``[1] … [5]`` in an enumerated
  list is not a rating); otherwise the next fallback is tried, and if none is usable the
  verdict is malformed as *ambiguous*;
* matching is case-insensitive and tolerates spaces and markdown emphasis (``**[[ 7 ]]**``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_NUM = r"(\d+(?:\.\d+)?)"

RATING_PATTERNS: list[tuple[str, re.Pattern]] = [
    # [[7]], [[7.5]], [[ 7 ]], [[7/10]], [[Rating: 7]]
    ("double-bracket", re.compile(
        r"\[\[\s*(?:rating|score)?\s*[:=]?\s*" + _NUM + r"\s*(?:/\s*10\s*)?\]\]", re.I)),
    # [7], [7/10]
    ("single-bracket", re.compile(r"(?<![\[\w])\[\s*" + _NUM + r"\s*(?:/\s*10\s*)?\](?!\])")),
    # Rating: 7, Score = 7.5, rating of 8, "Rating: **7**"
    ("rating-label", re.compile(
        r"\b(?:rating|score)\b\s*(?:of\b|is\b)?\s*[:=]?\s*[*_]*\s*" + _NUM + r"(?!\s*[-–]\s*\d)", re.I)),
    # 7/10, 7 out of 10
    ("out-of-ten", re.compile(_NUM + r"\s*(?:/|out of)\s*10\b", re.I)),
]

PAIRWISE_PATTERNS: list[tuple[str, re.Pattern]] = [
    ("double-bracket", re.compile(r"\[\[\s*(A|B|C|tie)\s*\]\]", re.I)),
    ("single-bracket", re.compile(r"(?<![\[\w])\[\s*(A|B|C|tie)\s*\](?![\]\w])", re.I)),
    ("verdict-label", re.compile(
        r"\b(?:final\s+)?(?:verdict|winner|decision)\b\s*(?:is\b)?\s*:?\s*[*_\"']*\s*"
        r"(?:answer\s+|assistant\s+)?(A|B|C|tie)\b", re.I)),
]

PASS_FAIL_PATTERNS: list[tuple[str, re.Pattern]] = [
    ("double-bracket", re.compile(r"\[\[\s*(PASS|FAIL)\s*\]\]", re.I)),
    ("single-bracket", re.compile(r"(?<!\[)\[\s*(PASS|FAIL)\s*\](?!\])", re.I)),
    ("verdict-label", re.compile(
        r"\b(?:verdict|result|grade|decision)\b\s*(?:is\b)?\s*:?\s*[*_\"']*\s*(PASS|FAIL)\b", re.I)),
]


@dataclass
class Parsed:
    """One parsed verdict.

    ``value`` is the verdict (a float rating, ``"A"``/``"B"``/``"C"``, ``"PASS"``/``"FAIL"``)
    or ``None`` when malformed; ``pattern`` names the rule that matched (``"double-bracket"``
    is the requested format; anything else is a *lenient* parse); ``problem`` says why a
    malformed verdict was rejected.
    """

    value: Any
    pattern: str | None = None
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.value is not None

    @property
    def strict(self) -> bool:
        return self.pattern == "double-bracket"


def find_verdict(text: str, patterns: list[tuple[str, re.Pattern]],
          norm: Callable[[str], Any]) -> tuple[str, str] | str | None:
    """(pattern name, raw match), or a problem string for ambiguous fallbacks, or None.

    The strict (first) pattern takes its last match. A fallback is used only if all of its
    matches agree: ``[1] … [5]`` in an enumerated list is not a rating.
    """
    ambiguous = None
    for k, (name, pattern) in enumerate(patterns):
        matches = pattern.findall(text)
        if not matches:
            continue
        if k == 0 or len({norm(m) for m in matches}) == 1:
            return name, matches[-1]
        ambiguous = ambiguous or (f"ambiguous verdict ({name} matches disagree: "
                                  f"{', '.join(dict.fromkeys(matches))})")
    return ambiguous


def parse_rating(text: str | None, low: float = 1.0, high: float = 10.0) -> Parsed:
    """The 1–10 rating in a single-answer judgment (see the module docstring for the rules).

    >>> parse_rating("Clear and correct. Rating: [[8]]").value
    8.0
    >>> parse_rating("I cannot decide.").problem
    'no rating found'
    """
    if not text or not text.strip():
        return Parsed(None, None, "empty judgment")
    found = find_verdict(text, RATING_PATTERNS, float)
    if not isinstance(found, tuple):
        return Parsed(None, None, found or "no rating found")
    name, raw = found
    value = float(raw)
    if not low <= value <= high:
        return Parsed(None, name, f"rating {raw} outside {low:g}-{high:g}")
    return Parsed(value, name)


def _pair_norm(raw: str) -> str:
    value = raw.upper()
    return "C" if value == "TIE" else value


def parse_pairwise(text: str | None) -> Parsed:
    """``"A"``, ``"B"`` or ``"C"`` (tie) from a pairwise judgment; ``[[tie]]`` reads as C."""
    if not text or not text.strip():
        return Parsed(None, None, "empty judgment")
    found = find_verdict(text, PAIRWISE_PATTERNS, _pair_norm)
    if not isinstance(found, tuple):
        return Parsed(None, None, found or "no verdict found")
    name, raw = found
    return Parsed(_pair_norm(raw), name)


def parse_pass_fail(text: str | None) -> Parsed:
    """``"PASS"`` or ``"FAIL"`` from a chat-bench judgment."""
    if not text or not text.strip():
        return Parsed(None, None, "empty judgment")
    found = find_verdict(text, PASS_FAIL_PATTERNS, str.upper)
    if not isinstance(found, tuple):
        return Parsed(None, None, found or "no verdict found")
    name, raw = found
    return Parsed(raw.upper(), name)
