"""Live statistics over the judgments: agreement, Krippendorff's alpha, position bias, throughput.

All the arithmetic is in pure functions over plain values (tested by hand-worked examples);
:func:`summary` reads the database once and assembles the admin page's numbers.

Direction. Every judgment has a direction: the stored response it prefers (the 8-point scale
has no middle point, 4 and 5 being the close calls). Agreement is measured on the direction.

* Item agreement: the share of the item's judgments on its majority side (1.0 = unanimous,
  0.5 = an even split of two).
* Annotator agreement: on items that at least one other annotator judged, the share of this
  annotator's judgments that match the majority of the *other* annotators (items where the
  others are split evenly are not counted).
* Krippendorff's alpha (nominal) on the direction, over the items with two or more judgments:
  ``alpha = 1 - D_o / D_e`` with the coincidence-matrix formulation; 1 is perfect agreement,
  0 is chance, negative is systematic disagreement. None when undefined (fewer than two
  pairable values, or every value the same).
* Position bias: how often the response shown on the left won, with a 95% Wilson interval.
  Because the left side is randomised, an unbiased crowd sits at 0.5.
* Per-model human win rates: over the pair judgments whose items name two models (live turns,
  or imported pairs with ``model_a``/``model_b``), each model's share of its battles won.
* Throughput: judgments in the last hour and day; overall judgments per hour between the first
  and the last judgment (once they are at least 5 minutes apart); per annotator, judgments per
  hour of judging time (the seconds spent on each item, capped at 10 minutes so that breaks do
  not count); the median seconds spent per judgment.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter, defaultdict
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import func, select

from rlhfkit.label.battles import iter_battles, win_rates
from rlhfkit.label.db import Assignment, Database, Item, Judgment, Ranking, User, now

WORK_CAP_SECONDS = 600.0  # longer than this on one item: a break, counted as 10 minutes
MIN_SPAN_SECONDS = 300.0  # an overall rate over less than 5 minutes says little


@dataclass(frozen=True)
class Vote:
    """The part of a judgment the statistics need."""

    item_id: int
    user_id: int
    preferred: str  # response_a | response_b
    likert: int  # stored orientation, 1 = response_a much better
    left_side: str
    created_at: float
    seconds: float

    @property
    def left_won(self) -> bool:
        return self.preferred == self.left_side


# --------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------


def krippendorff_alpha_nominal(units: Iterable[Sequence[Hashable]]) -> float | None:
    """Krippendorff's alpha for nominal data; ``units`` holds the values each unit received.

    Coincidences: a unit with m >= 2 values adds 1/(m-1) to o[c][k] for every ordered pair of
    its values (c from one coder, k from another). With n_c = sum_k o[c][k] and n = sum_c n_c,
    ``D_o = sum_{c != k} o[c][k]`` and ``D_e = sum_{c != k} n_c * n_k / (n - 1)``;
    ``alpha = 1 - D_o / D_e``.
    """
    o: dict[tuple, float] = defaultdict(float)
    for values in units:
        values = list(values)
        m = len(values)
        if m < 2:
            continue
        counts = Counter(values)
        for c, nc in counts.items():
            for k, nk in counts.items():
                pairs = nc * (nk - 1) if c == k else nc * nk
                if pairs:
                    o[(c, k)] += pairs / (m - 1)
    n_c: dict[Hashable, float] = defaultdict(float)
    for (c, _k), v in o.items():
        n_c[c] += v
    n = sum(n_c.values())
    if n <= 1:
        return None
    d_o = sum(v for (c, k), v in o.items() if c != k)
    d_e = sum(n_c[c] * n_c[k] for c in n_c for k in n_c if c != k) / (n - 1)
    if d_e == 0:
        return None
    return 1.0 - d_o / d_e


def pairwise_agreement(units: Iterable[Sequence[Hashable]]) -> float | None:
    """The share of pairs of judgments of the same item that agree (over all items)."""
    agree = total = 0
    for values in units:
        counts = Counter(values)
        m = sum(counts.values())
        total += m * (m - 1) // 2
        agree += sum(c * (c - 1) // 2 for c in counts.values())
    return agree / total if total else None


def majority(prefs: Sequence[str]) -> str | None:
    """The side with more votes, or None on an even split (or no votes)."""
    a, b = prefs.count("response_a"), prefs.count("response_b")
    if a == b:
        return None
    return "response_a" if a > b else "response_b"


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float] | None:
    if n == 0:
        return None
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def item_stats(votes: Sequence[Vote]) -> dict[int, dict]:
    by_item: dict[int, list[Vote]] = defaultdict(list)
    for v in votes:
        by_item[v.item_id].append(v)
    out = {}
    for item_id, vs in by_item.items():
        prefs = [v.preferred for v in vs]
        a, b = prefs.count("response_a"), prefs.count("response_b")
        out[item_id] = {
            "item_id": item_id, "n": len(vs), "votes_a": a, "votes_b": b,
            "majority": majority(prefs), "agreement": max(a, b) / len(vs),
            "mean_likert": sum(v.likert for v in vs) / len(vs),
        }
    return out


def annotator_stats(votes: Sequence[Vote]) -> dict[int, dict]:
    by_item: dict[int, list[Vote]] = defaultdict(list)
    for v in votes:
        by_item[v.item_id].append(v)
    by_user: dict[int, list[Vote]] = defaultdict(list)
    for v in votes:
        by_user[v.user_id].append(v)
    out = {}
    for user_id, vs in by_user.items():
        compared = matched = 0
        for v in vs:
            others = [o.preferred for o in by_item[v.item_id] if o.user_id != user_id]
            maj = majority(others)
            if maj is None:
                continue
            compared += 1
            matched += v.preferred == maj
        times = sorted(v.created_at for v in vs)
        work_s = sum(min(v.seconds, WORK_CAP_SECONDS) for v in vs)
        out[user_id] = {
            "user_id": user_id, "n": len(vs),
            "compared": compared,
            "agreement": matched / compared if compared else None,
            "left_win_rate": sum(v.left_won for v in vs) / len(vs),
            "median_seconds": statistics.median(v.seconds for v in vs),
            "per_hour": 3600 * len(vs) / work_s if work_s > 0 else None,
            "last_at": times[-1],
        }
    return out


def position_bias(votes: Sequence[Vote]) -> dict:
    n = len(votes)
    left = sum(v.left_won for v in votes)
    return {"n": n, "left_wins": left, "rate": left / n if n else None,
            "ci95": wilson_interval(left, n)}


def throughput(votes: Sequence[Vote], at: float | None = None) -> dict:
    at = now() if at is None else at
    times = sorted(v.created_at for v in votes)
    span_s = times[-1] - times[0] if len(times) > 1 else 0.0
    return {
        "judgments": len(votes),
        "last_hour": sum(1 for t in times if t > at - 3600),
        "last_day": sum(1 for t in times if t > at - 86400),
        "per_hour": 3600 * (len(times) - 1) / span_s if span_s >= MIN_SPAN_SECONDS else None,
        "median_seconds": statistics.median(v.seconds for v in votes) if votes else None,
    }


def agreement_summary(votes: Sequence[Vote]) -> dict:
    by_item: dict[int, list[str]] = defaultdict(list)
    for v in votes:
        by_item[v.item_id].append(v.preferred)
    multi = [p for p in by_item.values() if len(p) >= 2]
    return {
        "items_with_2plus": len(multi),
        "krippendorff_alpha": krippendorff_alpha_nominal(multi),
        "pairwise_agreement": pairwise_agreement(multi),
        "unanimous_items": sum(1 for p in multi if len(set(p)) == 1),
        "disagreeing_items": sum(1 for p in multi if len(set(p)) > 1),
    }


# --------------------------------------------------------------------------------------------
# From the database
# --------------------------------------------------------------------------------------------


def load_votes(db: Database) -> list[Vote]:
    with db.reading() as s:
        rows = s.execute(select(Judgment.item_id, Judgment.user_id, Judgment.preferred,
                                Judgment.likert, Judgment.left_side, Judgment.created_at,
                                Judgment.seconds).order_by(Judgment.id)).all()
    return [Vote(*r) for r in rows]


def summary(db: Database, item_limit: int = 50) -> dict:
    """Everything the admin page shows, as JSON-ready values."""
    votes = load_votes(db)
    items = item_stats(votes)
    with db.reading() as s:
        targets = dict(s.execute(select(Item.id, Item.target)).all())
        ranked = dict(s.execute(select(Ranking.item_id, func.count(Ranking.id)).group_by(Ranking.item_id)).all())
        users = {u.id: u for u in s.scalars(select(User)).all()}
        skips = Counter(dict(s.execute(select(Assignment.user_id, func.count(Assignment.id))
                                       .where(Assignment.status == "skipped")
                                       .group_by(Assignment.user_id)).all()))
        open_now = int(s.scalar(select(func.count(Assignment.id))
                                .where(Assignment.status == "open")) or 0)
        prompts = {}
        worst = sorted((it for it in items.values() if it["n"] >= 2),
                       key=lambda it: (it["agreement"], -it["n"], it["item_id"]))[:item_limit]
        if worst:
            for item in s.scalars(select(Item).where(Item.id.in_([w["item_id"] for w in worst]))):
                last = item.conversation()[-1]["content"]
                prompts[item.id] = last[:200]
    judged = {i: items.get(i, {}).get("n", 0) + ranked.get(i, 0) for i in targets}  # a ranking task: its rankings
    complete = sum(1 for i, t in targets.items() if judged[i] >= t)
    started = sum(1 for i in targets if judged[i])
    per_user = annotator_stats(votes)
    annotators = []
    for uid, u in sorted(users.items()):
        st = per_user.get(uid, {"n": 0, "compared": 0, "agreement": None, "left_win_rate": None,
                                "median_seconds": None, "per_hour": None, "last_at": None})
        annotators.append({**st, "user_id": uid, "name": u.name, "role": u.role,
                           "skips": skips.get(uid, 0)})
    return {
        "progress": {
            "items": len(targets), "complete": complete, "in_progress": started - complete,
            "not_started": len(targets) - started,
            "judgments": len(votes) + sum(ranked.values()), "wanted": sum(targets.values()),
            "skips": sum(skips.values()), "open_assignments": open_now,
            "annotators": sum(1 for u in users.values()),
        },
        "agreement": agreement_summary(votes),
        "position_bias": position_bias(votes),
        "throughput": throughput(votes),
        "annotators": annotators,
        "models": win_rates(iter_battles(db)),
        "disagreements": [{**w, "target": targets.get(w["item_id"]),
                           "prompt": prompts.get(w["item_id"], "")}
                          for w in worst if w["agreement"] < 1.0],
    }


def items_agreement(db: Database) -> list[dict]:
    """Every item with its target and, once judged, its votes, majority and agreement."""
    per_item = item_stats(load_votes(db))
    with db.reading() as s:
        rows = s.execute(select(Item.id, Item.target).order_by(Item.id)).all()
    empty = {"n": 0, "votes_a": 0, "votes_b": 0, "majority": None, "agreement": None,
             "mean_likert": None}
    return [{"item_id": i, "target": t, **{k: v for k, v in per_item.get(i, empty).items()
                                           if k != "item_id"}} for i, t in rows]
