"""A judge's pairwise verdict read from its reply: the letter, and the soft label where it can be had.

The letter is MT-Bench's ``[[A]]`` / ``[[B]]`` / ``[[C]]`` (tie), read by
:func:`rlhfkit.evaluation.judging.parsing.parse_pairwise` (its lenient fallbacks included).

The *soft label* is Constitutional AI's: instead of the sampled letter, the judge's probabilities of
the choices at the position where it wrote the letter. Where the reply carries token log-probs
(``Reply.logprobs``, with the ``top_logprobs`` most likely alternatives at each position):

1. the verdict's letter is located in the reply's tokens (the same pattern, last match, that
   the parser used), and the token covering it is the *verdict token*. Tokenizers differ: the
   letter may be a token of its own (``[[`` ``A`` ``]]``), carry a space (`` A``) or be merged
   with the brackets (``[[A``, ``A]]``, ``[[A]]``);
2. each alternative at that position is read as a choice when it is the same kind of token:
   whitespace, brackets and emphasis stripped, what is left is ``A``, ``B``, ``C`` or ``tie``
   (case-insensitive), so ``[[B`` is the alternative of ``[[A`` and `` b`` of `` A``;
   alternatives that are no choice (``[[``, ``The``) are ignored;
3. the probabilities of each choice are summed and normalised over A, B, C:
   ``P(X) = sum exp(logprob) of X's tokens / sum over all three choices``.

The probability that the reply *shown first* is better counts a tie as half a win either way:
``p_first = P(A) + P(C) / 2``. Asked in both orders, the probability that reply ``a`` is better
is the mean of the two views: ``P(a) = (p_first(a shown first) + 1 - p_first(b shown first)) / 2``.
A reply without log-probs (an endpoint that does not return them), or one whose verdict token
cannot be found among its tokens, has no soft label (``None``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from rlhfkit.evaluation.judging.parsing import PAIRWISE_PATTERNS, Parsed, parse_pairwise
from rlhfkit.models.backends import Reply, TokenLogprob

CHOICES = ("A", "B", "C")
_CHOICE_TOKENS = {"A": "A", "B": "B", "C": "C", "TIE": "C"}
_TOKEN_DECORATION = " \t\r\n[]*_\"'"


@dataclass(frozen=True)
class Verdict:
    """One judge reply's verdict: ``letter`` ``"A"``/``"B"``/``"C"`` (None: unparsed, see
    ``problem``) and, where the reply has log-probs, ``probs``: P of each choice (summing to 1)."""

    letter: str | None
    probs: dict[str, float] | None = None
    problem: str | None = None

    @property
    def p_first(self) -> float | None:
        """P(the reply shown first is better): P(A) + P(C) / 2."""
        return None if self.probs is None else self.probs["A"] + self.probs["C"] / 2


def choice_of_token(token: str) -> str | None:
    """The choice a token spells (``"[[a"`` -> ``"A"``, ``" tie"`` -> ``"C"``), or None."""
    return _CHOICE_TOKENS.get(token.strip(_TOKEN_DECORATION).upper())


def verdict_token(logprobs: tuple[TokenLogprob, ...], parsed: Parsed) -> TokenLogprob | None:
    """The token that carries the parsed verdict's letter (None if it cannot be found)."""
    pattern = dict(PAIRWISE_PATTERNS).get(parsed.pattern)
    if pattern is None or not logprobs:
        return None
    text = "".join(t.token for t in logprobs)
    matches = list(pattern.finditer(text))
    if not matches:
        return None
    at = matches[-1].start(1)
    start = 0
    for t in logprobs:
        if start <= at < start + len(t.token):
            return t
        start += len(t.token)
    return None


def choice_probabilities(token: TokenLogprob) -> dict[str, float] | None:
    """P(A), P(B), P(C) from the alternatives at the verdict token (None if none is a choice)."""
    alternatives = {**token.top, token.token: token.logprob}
    mass = dict.fromkeys(CHOICES, 0.0)
    for text, logprob in alternatives.items():
        choice = choice_of_token(text)
        if choice is not None:
            mass[choice] += math.exp(logprob)
    total = sum(mass.values())
    if total <= 0:
        return None
    return {c: m / total for c, m in mass.items()}


def read_verdict(reply: Reply) -> Verdict:
    """The verdict in a judge's reply, with its soft label where the reply has log-probs."""
    parsed = parse_pairwise(reply.text)
    if not parsed.ok:
        return Verdict(None, None, parsed.problem)
    probs = None
    if reply.logprobs:
        token = verdict_token(reply.logprobs, parsed)
        if token is not None and choice_of_token(token.token) == parsed.value:
            probs = choice_probabilities(token)
    return Verdict(parsed.value, probs)


def p_first_of_pair(shown_first: Verdict, shown_second: Verdict) -> float | None:
    """P(reply ``a`` is better) from the verdict with ``a`` shown first and the one with ``a`` shown
    second: the mean of the two views (None unless both have a soft label)."""
    if shown_first.p_first is None or shown_second.p_first is None:
        return None
    return (shown_first.p_first + 1.0 - shown_second.p_first) / 2
