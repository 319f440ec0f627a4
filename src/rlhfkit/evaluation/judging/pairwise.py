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
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

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
