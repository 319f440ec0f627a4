"""Human votes as arena battles, and each model's human win rate.

A pair judgment is a battle when its item's metadata names two different models: ``model_a``
(the model that wrote ``response_a``) and ``model_b``. Live turns always do (see
:mod:`rlhfkit.label.live`); imported pairs do when their records carry the two fields. A battle
is ``{"model_a", "model_b", "winner": "model_a" | "model_b", "item_id", "judgment_id",
"annotator_id", "likert", "live"}``, the format ``rlhfkit arena`` reads (Chatbot Arena's), in the
order the judgments were made (online Elo depends on it). The 8-point scale has no tie.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable, Iterator

from sqlalchemy import select

from rlhfkit.label.db import Database, Item, Judgment


def battle_models(meta: dict | None) -> tuple[str, str] | None:
    """(model of response_a, model of response_b) from an item's metadata, when it names two."""
    a, b = (meta or {}).get("model_a"), (meta or {}).get("model_b")
    if isinstance(a, str) and isinstance(b, str) and a and b and a != b:
        return a, b
    return None


def iter_battles(db: Database, exclude_flags: Collection[str] = ()) -> Iterator[dict]:
    """One battle per pair judgment of an item with two named models, unless a response of it
    was flagged with one of ``exclude_flags``."""
    with db.reading() as s:
        rows = s.execute(select(Judgment, Item.meta).join(Item, Item.id == Judgment.item_id)
                         .order_by(Judgment.id)).all()
    for j, meta in rows:
        models = battle_models(meta)
        flagged = {name for names in (j.flags or {}).values() for name in names}
        if models is None or flagged & set(exclude_flags):
            continue
        yield {"model_a": models[0], "model_b": models[1],
               "winner": "model_a" if j.preferred == "response_a" else "model_b",
               "item_id": j.item_id, "judgment_id": j.id, "annotator_id": j.user_id, "likert": j.likert,
               "live": (meta or {}).get("live")}


def win_rates(battles: Iterable[dict]) -> list[dict]:
    """Per model: battles, wins and the share won, best first (then by name)."""
    played: Counter = Counter()
    won: Counter = Counter()
    for b in battles:
        played.update([b["model_a"], b["model_b"]])
        won[b[b["winner"]]] += 1
    rows = [{"model": m, "battles": n, "wins": won[m], "win_rate": won[m] / n} for m, n in played.items()]
    return sorted(rows, key=lambda r: (-r["win_rate"], r["model"]))
