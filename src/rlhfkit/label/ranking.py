"""Ranking tasks: K completions (2 <= K <= 4) that an annotator orders from best to worst.

The completions are shown in an order drawn per annotator and item (``Assignment.display_order``:
the completion indices shown as A, B, C, D), so the stored ranking never depends on where a
completion happened to be shown. ``POST /api/rankings`` takes the labels as shown, best first
(``{"item_id": 7, "ranking": ["C", "A", "B"]}``, with optional ``flags`` per label, ``rating`` and
``rationale`` as for pairs); the row keeps both the labels and the completion indices. A ranking is
stored once per (item, annotator), with the same guarantees as a pair judgment (see
:mod:`rlhfkit.label.service`): an identical resend is answered 200, a different one 409.

Export (one row per ranking task with at least one ranking), in the schema ``rlhfkit rm`` reads
(``rlhfkit.data.schema``: ``ranking`` lists completion indices, best first)::

    {"prompt", "completions", "ranking", "n_judgments", "agreement", "rankings", ...}

Several annotators' rankings are combined by mean position (Borda), ties broken by the lower
completion index; ``agreement`` is the share of the (annotator, pair of completions) orderings
that agree with the combined ranking (1.0 when every annotator gave the same ranking).
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from rlhfkit.label.db import Database, Item, Ranking, now
from rlhfkit.label.service import (
    LABELS,
    LabelError,
    close_assignment,
    parse_annotations,
    served_item,
    store_once,
)


@dataclass
class RankingIn:
    """A validated ranking as the annotator gave it: labels as shown, best first."""

    item_id: int
    ranking: list[str]
    flags: dict[str, list[str]]
    rating: str | None
    rationale: str


def parse_ranking(body: Any) -> RankingIn:
    """Validate a POST /api/rankings body (labels are checked against the item when stored)."""
    if not isinstance(body, dict):
        raise LabelError(422, 'the body must be a JSON object like {"item_id": 1, "ranking": ["B", "A", "C"]}')
    problems: list[str] = []
    allowed = {"item_id", "ranking", "flags", "rating", "rationale"}
    problems += [f"unknown field {k!r} (expected {', '.join(sorted(allowed))})" for k in body if k not in allowed]
    item_id = body.get("item_id")
    if isinstance(item_id, bool) or not isinstance(item_id, int):
        problems.append(f"item_id: required, an integer (got {item_id!r})")
    ranking = body.get("ranking")
    if not isinstance(ranking, list) or not all(isinstance(x, str) and x in LABELS for x in ranking) \
            or len(set(ranking)) != len(ranking) or len(ranking) < 2:
        problems.append(f"ranking: required, the labels as shown best first, each once, like "
                        f'["C", "A", "B"] (got {ranking!r})')
        ranking = []
    flags, rating, rationale = parse_annotations(body, tuple(LABELS), problems)
    if problems:
        raise LabelError(422, "; ".join(problems), problems=problems)
    return RankingIn(item_id, list(ranking), flags, rating, rationale)


def ranking_to_json(r: Ranking) -> dict:
    return {"id": r.id, "item_id": r.item_id, "user_id": r.user_id, "ranking": r.ranking_shown,
            "ranking_stored": r.ranking, "display_order": r.display_order, "flags": r.flags,
            "rating": r.rating, "rationale": r.rationale, "shown_at": r.shown_at,
            "created_at": r.created_at, "seconds": r.seconds}


def _existing(s, item_id: int, user_id: int) -> Ranking | None:
    return s.scalars(select(Ranking).where(Ranking.item_id == item_id, Ranking.user_id == user_id)).first()


def _stored(r: RankingIn, order: list[int]) -> tuple[list[int], dict[str, list[str]]]:
    """Labels as shown -> (completion indices best first, flags by completion index)."""
    index_of = {LABELS[pos]: i for pos, i in enumerate(order)}
    flags = {str(index_of[label]): names for label, names in r.flags.items() if names}
    return [index_of[label] for label in r.ranking], flags


def _resolve_duplicate(existing: Ranking, r: RankingIn) -> tuple[int, dict]:
    ranking, flags = _stored(r, existing.display_order)
    if (existing.ranking, existing.flags or {}, existing.rating, existing.rationale or "") == \
            (ranking, flags, r.rating, r.rationale):
        return 200, {**ranking_to_json(existing), "duplicate": True}
    raise LabelError(409, f"you already ranked item {r.item_id} (ranking {existing.id}); "
                          "rankings cannot be changed", judgment=ranking_to_json(existing))


def _record(db: Database, user_id: int, r: RankingIn) -> tuple[int, dict]:
    with db.writing() as s:
        item, a = served_item(s, r.item_id, user_id, ranking=True)
        labels = LABELS[:len(item.completions)]
        if sorted(r.ranking) != list(labels):
            raise LabelError(422, f"ranking: give each of {', '.join(labels)} once, best first (got {r.ranking})")
        unknown = [label for label, names in r.flags.items() if names and label not in labels]
        if unknown:
            raise LabelError(422, f"flags: this item shows only {', '.join(labels)} (got {', '.join(unknown)})")
        existing = _existing(s, r.item_id, user_id)
        if existing is not None:
            return _resolve_duplicate(existing, r)
        ranking, flags = _stored(r, a.display_order)
        t = now()
        row = Ranking(item_id=item.id, user_id=user_id, display_order=a.display_order, ranking_shown=r.ranking,
                      ranking=ranking, flags=flags, rating=r.rating, rationale=r.rationale,
                      shown_at=a.shown_at, created_at=t, seconds=max(0.0, t - a.shown_at))
        s.add(row)
        s.flush()  # raises IntegrityError here if a racing request got in first
        close_assignment(s, item, a, t)
        s.flush()
        return 201, ranking_to_json(row)


def record_ranking(db: Database, user_id: int, r: RankingIn) -> tuple[int, dict]:
    """Store ``r`` for ``user_id``: (201, stored) or (200, the identical stored one)."""
    return store_once(db, user_id, r, _record, _existing, _resolve_duplicate)


# --------------------------------------------------------------------------------------------
# Export


def combined_ranking(rankings: list[list[int]], k: int) -> list[int]:
    """Completion indices best first by mean position over ``rankings`` (ties: lower index first)."""
    position = {i: sum(r.index(i) for r in rankings) / len(rankings) for i in range(k)}
    return sorted(range(k), key=lambda i: (position[i], i))


def ranking_agreement(rankings: list[list[int]], combined: list[int]) -> float:
    """Share of (annotator, pair of completions) orderings that agree with ``combined``."""
    agree = total = 0
    for r in rankings:
        for better, worse in itertools.combinations(combined, 2):
            total += 1
            agree += r.index(better) < r.index(worse)
    return agree / total


def aggregate_ranking(item: Item, rankings: list[Ranking]) -> dict:
    """One export row for a ranking task from its rankings (there is at least one)."""
    orders = [r.ranking for r in sorted(rankings, key=lambda r: r.id)]
    combined = combined_ranking(orders, len(item.completions))
    flags: dict[str, Counter] = {str(i): Counter() for i in range(len(item.completions))}
    for r in rankings:
        for i, names in (r.flags or {}).items():
            flags[i].update(names)
    ratings = Counter(r.rating for r in rankings if r.rating)
    return {"prompt": item.prompt, "completions": list(item.completions), "ranking": combined,
            "n_judgments": len(orders), "agreement": round(ranking_agreement(orders, combined), 4),
            "rankings": orders, "annotator_ids": sorted(r.user_id for r in rankings), "item_id": item.id,
            "flags": {i: dict(sorted(c.items())) for i, c in flags.items()},
            "ratings": {"good": ratings.get("good", 0), "bad": ratings.get("bad", 0)},
            "metadata": item.meta or {}}
