"""``label export``: judgments -> preference pairs that ``rlhfkit rm`` and ``rlhfkit dpo`` read.

The aggregation rule, per item with at least one judgment:

1. Each judgment votes for a direction: the stored response it prefers (Likert 1-4 prefer the
   response shown as A, 5-8 the one shown as B; the display order is undone first).
2. The majority direction wins: ``chosen`` is that response, ``rejected`` the other.
3. ``margin`` is the mean margin of the judgments on the majority side, each judgment's from
   ``rlhfkit.data.likert.to_preference``: 0 for 4 and 5 (a close call), 1/3 for 3 and 6, 2/3 for
   2 and 7, 1 for 1 and 8 (much better). So 0 <= margin <= 1.
4. ``agreement`` is the share of the item's judgments on the majority side.
5. An item split evenly (as many votes each way) has no majority: it is dropped, or with
   ``--keep-ties`` written with ``"tie": true``, ``margin`` 0 and the responses in their stored
   order (``chosen`` = response_a) for trainers that handle ties.

A row: ``{"prompt", "chosen", "rejected", "margin", "n_judgments", "agreement",
"annotator_ids", "tie", "item_id", "chosen_is", "votes", "likerts", "left_wins", "flags",
"ratings", "quality", "quadrant", "metadata"}``. ``prompt`` is the imported string, or the message list of a
multi-turn conversation; ``chosen``/``rejected`` are strings.

Ranking tasks follow the pairs, one row each, ``{"prompt", "completions", "ranking", ...}``
(see :mod:`rlhfkit.label.ranking`); ``rlhfkit rm`` reads both kinds of row from one file.

Curation (:class:`Curation`, the export's ``--exclude-flag``, ``--min-agreement``,
``--min-judgments``, ``--quadrant``) drops rows after aggregation: a row any annotator flagged
with an excluded flag (on either response, or any completion), a row judged by several
annotators whose ``agreement`` is below the minimum (a row judged once has agreement 1), a row
with fewer judgments than the minimum, and with ``--quadrant``, a pair whose quadrant (from
the good/bad votes on each response: ``good-vs-bad`` = chosen good, rejected bad) is not one of
those asked for (ranking rows have no quadrant).

Battles (``--format battles``, :mod:`rlhfkit.label.battles`): one human vote per row in the
format ``rlhfkit arena`` reads; ``--exclude-flag`` applies to them too.
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select

from rlhfkit.data.io import write_jsonl
from rlhfkit.data.likert import to_preference
from rlhfkit.label.battles import iter_battles
from rlhfkit.label.db import Database, Item, Judgment, Ranking
from rlhfkit.label.ranking import aggregate_ranking
from rlhfkit.label.stats import majority


def aggregate(item: Item, judgments: list[Judgment], keep_ties: bool = False) -> dict | None:
    """One export row for ``item`` from its judgments (None: no judgments, or a dropped tie)."""
    if not judgments:
        return None
    prefs = [j.preferred for j in judgments]
    side = majority(prefs)
    tie = side is None
    if tie and not keep_ties:
        return None
    chosen_side = side or "response_a"
    rejected_side = "response_b" if chosen_side == "response_a" else "response_a"
    winners = [j for j in judgments if j.preferred == chosen_side]
    margin = 0.0 if tie else sum(to_preference(j.likert)[1] for j in winners) / len(winners)
    flags = {"chosen": Counter(), "rejected": Counter()}
    for j in judgments:
        for f in (j.flags or {}).get(chosen_side, []):
            flags["chosen"][f] += 1
        for f in (j.flags or {}).get(rejected_side, []):
            flags["rejected"][f] += 1
    ratings = Counter(j.rating for j in judgments if j.rating)
    quality, quadrant = _quality(judgments, chosen_side, rejected_side)
    return {
        "prompt": item.prompt,
        "chosen": item.text(chosen_side),
        "rejected": item.text(rejected_side),
        "margin": round(margin, 4),
        "n_judgments": len(judgments),
        "agreement": round(len(winners) / len(judgments), 4),
        "annotator_ids": sorted(j.user_id for j in judgments),
        "tie": tie,
        "item_id": item.id,
        "chosen_is": chosen_side,
        "votes": {"response_a": prefs.count("response_a"), "response_b": prefs.count("response_b")},
        "likerts": [j.likert for j in sorted(judgments, key=lambda j: j.id)],
        "left_wins": sum(1 for j in judgments if j.preferred == j.left_side),
        "flags": {k: dict(sorted(v.items())) for k, v in flags.items()},
        "ratings": {"good": ratings.get("good", 0), "bad": ratings.get("bad", 0)},
        "quality": quality,
        "quadrant": quadrant,
        "metadata": item.meta or {},
    }


def _quality(judgments: list[Judgment], chosen_side: str, rejected_side: str) -> tuple[dict, str | None]:
    """Good/bad votes on each response, and the pair's quadrant: ``"good-vs-bad"`` (the chosen
    response good, the rejected one bad), ``good-vs-good``, ``bad-vs-bad`` or ``bad-vs-good``; None
    unless each response has more votes one way than the other."""
    votes = {role: Counter((j.quality or {}).get(side) for j in judgments)
             for role, side in (("chosen", chosen_side), ("rejected", rejected_side))}
    counts = {role: {"good": c["good"], "bad": c["bad"]} for role, c in votes.items()}
    verdict = {role: "good" if c["good"] > c["bad"] else "bad" if c["bad"] > c["good"] else None
               for role, c in counts.items()}
    if None in verdict.values():
        return counts, None
    return counts, f"{verdict['chosen']}-vs-{verdict['rejected']}"


@dataclass
class Curation:
    """Which aggregated rows (and battles) the export keeps."""

    exclude_flags: list[str] = field(default_factory=list)
    min_agreement: float = 0.0
    min_judgments: int = 1
    quadrants: list[str] = field(default_factory=list)  # empty: any (rows without one included)

    def keep(self, row: dict) -> bool:
        flagged = {name for counts in row["flags"].values() for name in counts}
        return (not flagged & set(self.exclude_flags) and row["n_judgments"] >= self.min_judgments
                and (row["n_judgments"] < 2 or row["agreement"] >= self.min_agreement)
                and (not self.quadrants or row.get("quadrant") in self.quadrants))


@dataclass
class ExportResult:
    written: int
    ties_dropped: int
    ties_kept: int
    items_judged: int
    rankings: int = 0
    curated_out: int = 0


def iter_rows(db: Database, keep_ties: bool = False, counts: dict | None = None,
              chunk: int = 500, curation: Curation | None = None) -> Iterator[dict]:
    """Export rows in item order (pairs, then rankings) that ``curation`` keeps; ``counts`` (if
    given) receives the tallies."""
    counts = counts if counts is not None else {}
    counts.update(written=0, ties_dropped=0, ties_kept=0, items_judged=0, rankings=0, curated_out=0)
    curation = curation or Curation()
    for row in itertools.chain(_pair_rows(db, keep_ties, counts, chunk), _ranking_rows(db, counts, chunk)):
        if not curation.keep(row):
            counts["curated_out"] += 1
            continue
        counts["written"] += 1
        counts["rankings"] += "ranking" in row
        counts["ties_kept"] += bool(row.get("tie"))
        yield row


def _judged(s, table, chunk: int) -> Iterator[tuple[list[int], dict[int, Item], dict[int, list]]]:
    """Chunks of (item ids, their items, their rows of ``table``) over the items judged in ``table``."""
    item_ids = s.scalars(select(table.item_id).distinct().order_by(table.item_id)).all()
    for start in range(0, len(item_ids), chunk):
        ids = item_ids[start:start + chunk]
        items = {i.id: i for i in s.scalars(select(Item).where(Item.id.in_(ids)))}
        by_item: dict[int, list] = defaultdict(list)
        for j in s.scalars(select(table).where(table.item_id.in_(ids))):
            by_item[j.item_id].append(j)
        yield ids, items, by_item


def _ranking_rows(db: Database, counts: dict, chunk: int) -> Iterator[dict]:
    with db.reading() as s:
        for ids, items, by_item in _judged(s, Ranking, chunk):
            for item_id in ids:
                counts["items_judged"] += 1
                yield aggregate_ranking(items[item_id], by_item[item_id])


def _pair_rows(db: Database, keep_ties: bool, counts: dict, chunk: int) -> Iterator[dict]:
    with db.reading() as s:
        for ids, items, by_item in _judged(s, Judgment, chunk):
            for item_id in ids:
                counts["items_judged"] += 1
                row = aggregate(items[item_id], by_item[item_id], keep_ties)
                if row is None:
                    counts["ties_dropped"] += 1
                    continue
                yield row


def write_export(db: Database, output: str | Path, keep_ties: bool = False,
                 curation: Curation | None = None) -> ExportResult:
    """Write the JSONL atomically (a temporary file renamed into place)."""
    counts: dict = {}
    write_jsonl(output, iter_rows(db, keep_ties, counts, curation=curation))
    return ExportResult(**counts)


def write_battles(db: Database, output: str | Path, curation: Curation | None = None) -> int:
    """Write the battles JSONL atomically; returns how many."""
    battles = list(iter_battles(db, (curation or Curation()).exclude_flags))
    write_jsonl(output, battles)
    return len(battles)
