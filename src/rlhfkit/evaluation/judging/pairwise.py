"""Pairwise judging in both orders: combining the two verdicts and summarising.

Every comparison of model X against model Y is judged twice: game 1 shows X as assistant A and
Y as B; game 2 shows Y as A and X as B. Each verdict is first translated to X's point of view
(``"win"``, ``"loss"``, ``"tie"``) and then combined:

========================  ==========================  =====================
game 1 (X is A)           game 2 (X is B)             combined outcome
========================  ==========================  =====================
[[A]] (X wins)            [[B]] (X wins)              win, consistent
[[B]] (Y wins)            [[A]] (Y wins)              loss, consistent
[[C]]                     [[C]]                       tie, consistent
any two that disagree                                 tie, inconsistent
either malformed                                      invalid (excluded)
========================  ==========================  =====================

A pair whose verdicts disagree counts as a tie: a judge that merely prefers whichever answer
comes first then contributes nothing to either side (position-bias mitigation). A pair with a
malformed verdict is excluded from the tallies and counted separately, so a broken judge
does not quietly become a source of ties.

The *position-consistency rate* is the share of pairs (both verdicts valid) whose two
verdicts agree once translated to the same point of view.

The pairwise and win-rate modes (:mod:`rlhfkit.evaluation.judging.modes`) both judge this way:
:func:`pairwise_calls` makes the two games of every comparison, :func:`combine_games` matches
them again, and :func:`battles_from` writes the combined verdicts as Chatbot Arena battles.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from rlhfkit.evaluation.judging.calls import Call, Judged, available_turns, has_reference
from rlhfkit.evaluation.judging.data import Question
from rlhfkit.evaluation.judging.prompts import pairwise_messages

_FIRST = {"A": "win", "B": "loss", "C": "tie"}   # game 1: X shown as A
_SECOND = {"A": "loss", "B": "win", "C": "tie"}  # game 2: X shown as B


@dataclass
class PairOutcome:
    outcome: str        # "win" | "loss" | "tie" (from X's side) | "invalid"
    consistent: bool | None  # None when a verdict is malformed

    @property
    def preference(self) -> float | None:
        """1.0 win, 0.0 loss, 0.5 tie, None invalid."""
        return {"win": 1.0, "loss": 0.0, "tie": 0.5}.get(self.outcome)


def combine_verdicts(first: str | None, second: str | None) -> PairOutcome:
    """Combine game 1's verdict (X shown as A) and game 2's (X shown as B).

    Verdicts are ``"A"``, ``"B"``, ``"C"`` or ``None`` (malformed).

    >>> combine_verdicts("A", "B")
    PairOutcome(outcome='win', consistent=True)
    >>> combine_verdicts("A", "A")      # the judge always picked the first answer
    PairOutcome(outcome='tie', consistent=False)
    """
    if first not in _FIRST or second not in _SECOND:
        return PairOutcome("invalid", None)
    a, b = _FIRST[first], _SECOND[second]
    if a == b:
        return PairOutcome(a, True)
    return PairOutcome("tie", False)


def battle_winner(outcome: str) -> str | None:
    """A combined outcome as a Chatbot Arena ``winner`` with X as ``model_a``."""
    return {"win": "model_a", "loss": "model_b", "tie": "tie"}.get(outcome)


@dataclass
class PairSummary:
    pairs: int           # comparisons attempted
    wins: int
    losses: int
    ties: int            # including inconsistent pairs
    inconsistent: int    # pairs whose two verdicts disagreed (counted as ties)
    invalid: int         # pairs with a malformed verdict (excluded)
    win_rate: float      # (wins + ties / 2) / (wins + losses + ties); NaN if none
    consistency: float   # consistent / (pairs with both verdicts valid); NaN if none

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(outcomes: Iterable[PairOutcome]) -> PairSummary:
    """Wins, losses, ties, win rate and position-consistency over combined outcomes."""
    outcomes = list(outcomes)
    wins = sum(o.outcome == "win" for o in outcomes)
    losses = sum(o.outcome == "loss" for o in outcomes)
    ties = sum(o.outcome == "tie" for o in outcomes)
    invalid = sum(o.outcome == "invalid" for o in outcomes)
    inconsistent = sum(o.consistent is False for o in outcomes)
    decided = wins + losses + ties
    nan = float("nan")
    return PairSummary(
        pairs=len(outcomes), wins=wins, losses=losses, ties=ties, inconsistent=inconsistent,
        invalid=invalid,
        win_rate=(wins + 0.5 * ties) / decided if decided else nan,
        consistency=(decided - inconsistent) / decided if decided else nan,
    )


def pairwise_calls(questions: Sequence[Question], answers: dict[str, dict[str, list[str]]],
                   pairs: Sequence[tuple[str, str]]) -> list[Call]:
    """Two calls per (pair, question, turn): game 1 shows X as A, game 2 shows X as B."""
    calls = []
    for x, y in pairs:
        for q in questions:
            n = min(available_turns(answers[x], q), available_turns(answers[y], q))
            ax, ay = answers[x].get(q.key, []), answers[y].get(q.key, [])
            for t in range(1, n + 1):
                base = {"question_id": q.question_id, "category": q.category, "turn": t,
                        "model_x": x, "model_y": y, "reference_guided": has_reference(q, t)}
                calls.append(Call("pairwise", {**base, "game": 1, "model_a": x, "model_b": y},
                                  pairwise_messages(q.turns, ax, ay, t, q.reference)))
                calls.append(Call("pairwise", {**base, "game": 2, "model_a": y, "model_b": x},
                                  pairwise_messages(q.turns, ay, ax, t, q.reference)))
    return calls


@dataclass
class PairRecord:
    """One comparison of X with Y on one question and turn, both games combined."""

    question_id: Any
    category: str
    turn: int
    x: str
    y: str
    outcome: PairOutcome
    verdicts: tuple[Any, Any]   # game 1's and game 2's parsed verdicts (None: malformed or missing)


def combine_games(judged: Sequence[Judged]) -> list[PairRecord]:
    """Match game 1 and game 2 of each comparison and combine their verdicts."""
    games: dict[tuple, dict[int, Judged]] = defaultdict(dict)
    for j in judged:
        m = j.call.meta
        games[(str(m["question_id"]), m["turn"], m["model_x"], m["model_y"])][m["game"]] = j
    records = []
    for (_, turn, x, y), g in games.items():
        v1 = g[1].parsed.value if 1 in g else None
        v2 = g[2].parsed.value if 2 in g else None
        meta = (g.get(1) or g[2]).call.meta
        records.append(PairRecord(meta["question_id"], meta["category"], turn, x, y,
                                  combine_verdicts(v1, v2), (v1, v2)))
    return records


def battles_from(records: Sequence[PairRecord], judge_name: str) -> list[dict[str, Any]]:
    """Combined verdicts as Chatbot Arena battles (malformed pairs are left out)."""
    out = []
    for r in records:
        winner = battle_winner(r.outcome.outcome)
        if winner:
            out.append({"model_a": r.x, "model_b": r.y, "winner": winner,
                        "question_id": r.question_id, "turn": r.turn, "judge": judge_name})
    return out
