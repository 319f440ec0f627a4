"""What the app does to the database: users and sign-in, the queue, judgments, skips, escalation.

Every function takes a :class:`~rlhfkit.label.db.Database` and runs its own transaction(s), so
the web app, the CLI and the tests share one implementation.

Assignment rule
---------------
An item wants ``target`` judgments (``--overlap K`` at import, raised when its annotators
disagree). A slot is taken by a ``done`` assignment or by an ``open`` one served less than
``lease_seconds`` ago, so an annotator who walks away gives the slot back after the lease.
``next_item`` first returns the annotator's own open assignment (a reload shows the same item,
same sides); otherwise it claims the oldest item with a free slot that the annotator has never
been served (the unique (item, user) assignment makes "never twice" a database guarantee).
Claims run in ``BEGIN IMMEDIATE`` on SQLite and lock the item row on PostgreSQL, so two
annotators cannot both take the last slot.

Judgments are stored exactly once per (item, annotator): a unique constraint, a check before
the insert, and an ``IntegrityError`` handler for the race the check cannot see. Re-sending the
identical judgment is idempotent (200 with the stored one); a different judgment for an item
already judged is a 409 (the first one stands; judgments are never changed or deleted).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import and_, delete, func, or_, select
from sqlalchemy.exc import IntegrityError

from rlhfkit.data import likert as likert_scale
from rlhfkit.label.db import (
    FLAGS,
    SIDES,
    Assignment,
    Database,
    Item,
    Judgment,
    Ranking,
    User,
    WebSession,
    hash_token,
    new_token,
    now,
)

DEFAULT_LEASE_SECONDS = 30 * 60
LABELS = "ABCD"  # the responses as shown, in display order
CANDIDATES = 20  # items considered per claim attempt
MAX_RATIONALE = 20_000


class LabelError(Exception):
    """An API-level failure with its HTTP status and a readable message."""

    def __init__(self, status: int, message: str, **extra: Any):
        super().__init__(message)
        self.status = status
        self.message = message
        self.extra = extra


# --------------------------------------------------------------------------------------------
# Users and sign-in
# --------------------------------------------------------------------------------------------


def add_user(db: Database, name: str, role: str = "annotator", new_token_if_exists: bool = False
             ) -> tuple[User, str, bool]:
    """Create ``name`` (or, with ``new_token_if_exists``, give an existing user a new token).

    Returns (user, token, created). Only the token's sha256 is stored.
    """
    name = name.strip()
    if not name:
        raise LabelError(422, "the user name must not be empty")
    if role not in ("annotator", "admin"):
        raise LabelError(422, f"role must be annotator or admin (got {role!r})")
    token = new_token()
    try:
        with db.writing() as s:
            user = s.scalars(select(User).where(User.name == name)).first()
            if user is not None:
                if not new_token_if_exists:
                    raise LabelError(409, f"user {name!r} already exists "
                                          "(--new-token gives them a new token)")
                user.token_hash = hash_token(token)
                user.role = role
                # Signing in again is required everywhere: drop the old browser sessions.
                s.execute(delete(WebSession).where(WebSession.user_id == user.id))
                created = False
            else:
                user = User(name=name, role=role, token_hash=hash_token(token), created_at=now())
                s.add(user)
                created = True
            s.flush()
    except IntegrityError:
        raise LabelError(409, f"user {name!r} already exists") from None
    return user, token, created


def user_for_token(db: Database, token: str | None) -> User | None:
    if not token:
        return None
    with db.reading() as s:
        return s.scalars(select(User).where(User.token_hash == hash_token(token))).first()


def start_web_session(db: Database, user_id: int) -> str:
    """A new browser session for ``user_id``; returns the cookie value (stored hashed)."""
    value = new_token()
    with db.writing() as s:
        s.add(WebSession(session_hash=hash_token(value), user_id=user_id, created_at=now()))
    return value


def user_for_session(db: Database, value: str | None) -> User | None:
    if not value:
        return None
    with db.reading() as s:
        return s.scalars(select(User).join(WebSession, WebSession.user_id == User.id)
                         .where(WebSession.session_hash == hash_token(value))).first()


def end_web_session(db: Database, value: str | None) -> None:
    if value:
        with db.writing() as s:
            s.execute(delete(WebSession).where(WebSession.session_hash == hash_token(value)))


# --------------------------------------------------------------------------------------------
# The queue
# --------------------------------------------------------------------------------------------


def _slots_taken(item_id_col, cutoff: float):
    """Assignments holding a slot of the item: judged, or served and still within the lease."""
    return (select(func.count(Assignment.id))
            .where(Assignment.item_id == item_id_col,
                   or_(Assignment.status == "done",
                       and_(Assignment.status == "open", Assignment.shown_at > cutoff)))
            .scalar_subquery())


def _available_items(user_id: int, cutoff: float):
    seen = select(Assignment.id).where(Assignment.item_id == Item.id,
                                       Assignment.user_id == user_id).exists()
    return select(Item.id).where(Item.complete == 0, Item.target > _slots_taken(Item.id, cutoff),
                                 ~seen)


@dataclass
class Served:
    """An item as served to one annotator: the assignment (left side, time) and the item."""

    assignment: Assignment
    item: Item

    def shown(self) -> list[tuple[str, str]]:
        """(label, text) of the responses in display order: A = left (or first), B, C, D."""
        a, item = self.assignment, self.item
        if item.is_ranking:
            return [(LABELS[pos], item.completions[i]) for pos, i in enumerate(a.display_order)]
        right_side = "response_b" if a.left_side == "response_a" else "response_a"
        return [("A", item.text(a.left_side)), ("B", item.text(right_side))]

    def to_json(self, queue_remaining: int | None = None) -> dict:
        a, item = self.assignment, self.item
        if item.is_ranking:
            out = {"kind": "ranking", "item_id": item.id, "conversation": item.conversation(),
                   "prompt": item.prompt, "shown_at": a.shown_at, "flags": list(FLAGS),
                   "responses": [{"label": label, "text": text} for label, text in self.shown()]}
            if queue_remaining is not None:
                out["queue_remaining"] = queue_remaining
            return out
        right_side = "response_b" if a.left_side == "response_a" else "response_a"
        out = {
            "kind": "pair",
            "item_id": item.id,
            "conversation": item.conversation(),
            "prompt": item.prompt,
            "responses": [
                {"label": "A", "position": "left", "text": item.text(a.left_side)},
                {"label": "B", "position": "right", "text": item.text(right_side)},
            ],
            "left_is": a.left_side,
            "right_is": right_side,
            "shown_at": a.shown_at,
            "scale": {"1": "A (left) is much better", "8": "B (right) is much better"},
            "flags": list(FLAGS),
        }
        if queue_remaining is not None:
            out["queue_remaining"] = queue_remaining
        return out


def next_item(db: Database, user_id: int, lease_seconds: float = DEFAULT_LEASE_SECONDS,
              rng: secrets.SystemRandom | None = None) -> Served | None:
    """The annotator's current item, claiming a new one when they have none; None when empty."""
    rng = rng or secrets.SystemRandom()
    for _ in range(5):  # an IntegrityError (a race with the same user's other tab) retries
        try:
            return _claim(db, user_id, lease_seconds, rng)
        except IntegrityError:
            continue
    raise LabelError(503, "could not claim an item; try again")


def _claim(db: Database, user_id: int, lease_seconds: float, rng) -> Served | None:
    with db.writing() as s:
        current = s.scalars(select(Assignment)
                            .where(Assignment.user_id == user_id, Assignment.status == "open")
                            .order_by(Assignment.id).limit(1)).first()
        if current is not None:
            return Served(current, s.get(Item, current.item_id))
        t = now()
        cutoff = t - lease_seconds
        for _ in range(100):
            candidates = s.scalars(_available_items(user_id, cutoff).order_by(Item.id)
                                   .limit(CANDIDATES)).all()
            for item_id in candidates:
                # PostgreSQL: lock the item, then count again (another claim may have committed
                # since the candidates were read). SQLite: the transaction is already exclusive.
                item = s.execute(select(Item).where(Item.id == item_id).with_for_update()).scalar_one()
                taken = s.scalar(select(func.count(Assignment.id)).where(
                    Assignment.item_id == item_id,
                    or_(Assignment.status == "done",
                        and_(Assignment.status == "open", Assignment.shown_at > cutoff))))
                if taken >= item.target:
                    continue
                order = rng.sample(range(len(item.completions)), len(item.completions)) if item.is_ranking else None
                a = Assignment(item_id=item_id, user_id=user_id, left_side=rng.choice(SIDES),
                               display_order=order, status="open", shown_at=t)
                s.add(a)
                s.flush()
                return Served(a, item)
            if len(candidates) < CANDIDATES:
                return None  # every item is full or already seen
            # All of them filled up under us: read the candidates again (they are now excluded).
        raise LabelError(503, "the queue is too busy; try again")


def queue_remaining(db: Database, user_id: int, lease_seconds: float = DEFAULT_LEASE_SECONDS) -> int:
    """Items this annotator could still be served (their open one included)."""
    with db.reading() as s:
        cutoff = now() - lease_seconds
        free = s.scalar(select(func.count()).select_from(_available_items(user_id, cutoff).subquery()))
        open_ = s.scalar(select(func.count(Assignment.id)).where(
            Assignment.user_id == user_id, Assignment.status == "open"))
        return int(free or 0) + int(open_ or 0)


def skip(db: Database, user_id: int, item_id: int) -> None:
    """Give the item back: it will not be shown to this annotator again, and its slot frees."""
    with db.writing() as s:
        a = s.scalars(select(Assignment).where(Assignment.item_id == item_id,
                                               Assignment.user_id == user_id)).first()
        if a is None:
            if s.get(Item, item_id) is None:
                raise LabelError(404, f"item {item_id} does not exist")
            raise LabelError(409, f"item {item_id} was not served to you (GET /api/next first)")
        if a.status == "done":
            raise LabelError(409, f"item {item_id} is already judged; it cannot be skipped")
        if a.status == "open":
            a.status = "skipped"
            a.closed_at = now()


# --------------------------------------------------------------------------------------------
# Judgments
# --------------------------------------------------------------------------------------------


@dataclass
class JudgmentIn:
    """A validated judgment as the annotator gave it (display orientation: A = left)."""

    item_id: int
    likert: int  # 1 = A (left) much better ... 8 = B (right) much better
    flags: dict[str, list[str]]  # {"A": [...], "B": [...]}
    rating: str | None
    rationale: str
    quality: dict[str, str] = field(default_factory=dict)  # {"A": "good", "B": "bad"}, rated ones only


def _parse_quality(body: dict, problems: list[str]) -> dict[str, str]:
    """``quality``: each response on its own, ``{"A": "good", "B": "bad"}`` (either may be left out)."""
    quality = body.get("quality")
    if quality is None:
        return {}
    if not isinstance(quality, dict) or any(k not in ("A", "B") or v not in ("good", "bad")
                                            for k, v in quality.items()):
        problems.append(f'quality: must be an object like {{"A": "good", "B": "bad"}} (got {quality!r})')
        return {}
    return dict(quality)


def parse_annotations(body: dict, labels: Sequence[str], problems: list[str]
                      ) -> tuple[dict[str, list[str]], str | None, str]:
    """The parts of a judgment shared by pairs and rankings: flags per shown label, the good/bad
    rating of the conversation and the rationale; appends what is wrong to ``problems``."""
    flags_in = body.get("flags")
    flags: dict[str, list[str]] = {label: [] for label in labels}
    if flags_in is not None:
        if not isinstance(flags_in, dict):
            problems.append('flags: must be an object like {"A": ["hallucination"], "B": []}')
        else:
            for label, names in flags_in.items():
                if label not in labels:
                    problems.append(f"flags: unknown response {label!r} (the responses are "
                                    f"{', '.join(map(repr, labels))} as shown)")
                    continue
                if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                    problems.append(f"flags.{label}: must be a list of flag names")
                    continue
                bad = [n for n in names if n not in FLAGS]
                if bad:
                    problems.append(f"flags.{label}: unknown flag(s) {', '.join(map(repr, bad))} "
                                    f"(known: {', '.join(FLAGS)})")
                    continue
                flags[label] = sorted(set(names))
    rating = body.get("rating")
    if rating not in (None, "good", "bad"):
        problems.append(f"rating: must be \"good\", \"bad\" or null (got {rating!r})")
    rationale = body.get("rationale")
    if rationale is None:
        rationale = ""
    elif not isinstance(rationale, str):
        problems.append("rationale: must be a string")
        rationale = ""
    elif "\x00" in rationale:  # PostgreSQL text cannot hold NUL: refuse it on every backend
        problems.append("rationale: must not contain NUL (\\u0000) characters")
    elif len(rationale) > MAX_RATIONALE:
        problems.append(f"rationale: at most {MAX_RATIONALE} characters (got {len(rationale)})")
    return flags, rating, rationale


def parse_judgment(body: Any) -> JudgmentIn:
    """Validate a POST /api/judgments body; raises LabelError(422) naming every problem."""
    problems: list[str] = []
    if not isinstance(body, dict):
        raise LabelError(422, "the body must be a JSON object like "
                              '{"item_id": 1, "likert": 3}')
    allowed = {"item_id", "likert", "flags", "rating", "rationale", "quality"}
    for key in body:
        if key not in allowed:
            problems.append(f"unknown field {key!r} (expected {', '.join(sorted(allowed))})")
    item_id = body.get("item_id")
    if "item_id" not in body:
        problems.append("item_id: required")
    elif isinstance(item_id, bool) or not isinstance(item_id, int):
        problems.append(f"item_id: must be an integer (got {item_id!r})")
    likert = body.get("likert")
    if "likert" not in body:
        problems.append("likert: required (1 = A much better ... 8 = B much better)")
    else:
        try:
            likert_scale.check(likert)
        except ValueError as e:
            problems.append(f"likert: {e}")
    flags, rating, rationale = parse_annotations(body, ("A", "B"), problems)
    quality = _parse_quality(body, problems)
    if problems:
        raise LabelError(422, "; ".join(problems), problems=problems)
    return JudgmentIn(item_id=item_id, likert=likert, flags=flags, rating=rating,
                      rationale=rationale, quality=quality)


def _stored_orientation(j: JudgmentIn, left_side: str) -> tuple[int, str, dict[str, list[str]], dict | None]:
    """Display orientation -> stored: (likert with 1 = response_a much better, preferred, flags,
    quality by stored response or None)."""
    right_side = "response_b" if left_side == "response_a" else "response_a"
    likert = j.likert if left_side == "response_a" else 9 - j.likert
    preferred = "response_a" if likert_scale.to_preference(likert)[0] else "response_b"
    flags = {left_side: j.flags["A"], right_side: j.flags["B"]}
    side_of = {"A": left_side, "B": right_side}
    quality = {side_of[label]: q for label, q in sorted(j.quality.items())} or None
    return likert, preferred, {side: flags[side] for side in SIDES}, quality


def judgment_to_json(j: Judgment) -> dict:
    right = "response_b" if j.left_side == "response_a" else "response_a"
    return {
        "id": j.id, "item_id": j.item_id, "user_id": j.user_id,
        "likert": j.likert_shown, "likert_stored": j.likert,
        "left_is": j.left_side, "preferred": j.preferred,
        "preferred_position": "left" if j.preferred == j.left_side else "right",
        "flags": {"A": j.flags.get(j.left_side, []), "B": j.flags.get(right, [])},
        "flags_stored": j.flags,
        "rating": j.rating, "rationale": j.rationale,
        "quality": {label: (j.quality or {})[side] for label, side in (("A", j.left_side), ("B", right))
                    if side in (j.quality or {})},
        "quality_stored": j.quality or {},
        "shown_at": j.shown_at, "created_at": j.created_at, "seconds": j.seconds,
    }


def _existing_judgment(s, item_id: int, user_id: int) -> Judgment | None:
    return s.scalars(select(Judgment).where(Judgment.item_id == item_id,
                                            Judgment.user_id == user_id)).first()


def _same(existing: Judgment, j: JudgmentIn) -> bool:
    likert, _, flags, quality = _stored_orientation(j, existing.left_side)
    return (existing.likert_shown == j.likert and existing.likert == likert
            and {k: sorted(v) for k, v in (existing.flags or {}).items()} == flags
            and existing.rating == j.rating and (existing.rationale or "") == j.rationale
            and (existing.quality or None) == quality)


def _resolve_duplicate(existing: Judgment, j: JudgmentIn) -> tuple[int, dict]:
    if _same(existing, j):
        return 200, {**judgment_to_json(existing), "duplicate": True}
    raise LabelError(409, f"you already judged item {j.item_id} (judgment {existing.id}); "
                          "judgments cannot be changed", judgment=judgment_to_json(existing))


def store_once(db: Database, user_id: int, j, record: Callable, existing_of: Callable,
               resolve: Callable) -> tuple[int, dict]:
    """``record(db, user_id, j)``, once per (item, annotator): when a racing request for the same
    pair committed between the check and the insert, answer with ``resolve(existing, j)``."""
    for _ in range(3):
        try:
            return record(db, user_id, j)
        except IntegrityError:
            with db.reading() as s:
                existing = existing_of(s, j.item_id, user_id)
            if existing is not None:
                return resolve(existing, j)
    raise LabelError(503, "the judgment could not be stored; send it again")


def record_judgment(db: Database, user_id: int, j: JudgmentIn) -> tuple[int, dict]:
    """Store ``j`` for ``user_id``. Returns (201, stored) or (200, the identical stored one)."""
    return store_once(db, user_id, j, _record, _existing_judgment, _resolve_duplicate)


def served_item(s, item_id: int, user_id: int, ranking: bool) -> tuple[Item, Assignment]:
    """The item (locked) and its assignment to ``user_id``; 404/409 when there is none, or when it
    is the other kind of task (a ranking sent as a pair judgment, or the other way round)."""
    item = s.execute(select(Item).where(Item.id == item_id).with_for_update()).scalar_one_or_none()
    if item is None:
        raise LabelError(404, f"item {item_id} does not exist")
    if item.is_ranking != ranking:
        kind, url = ("a ranking task", "/api/rankings") if item.is_ranking else ("a pair", "/api/judgments")
        raise LabelError(409, f"item {item_id} is {kind}: send its judgment to {url}")
    a = s.scalars(select(Assignment).where(Assignment.item_id == item_id,
                                           Assignment.user_id == user_id)).first()
    if a is None:
        raise LabelError(409, f"item {item_id} was not served to you (GET /api/next first)")
    return item, a


def close_assignment(s, item: Item, a: Assignment, t: float) -> None:
    """A judgment of ``item`` was just added under its lock: the slot is done, the count moves."""
    a.status = "done"
    a.closed_at = t
    item.judged += 1
    _maybe_escalate(s, item)
    item.complete = int(item.judged >= item.target)


def _record(db: Database, user_id: int, j: JudgmentIn) -> tuple[int, dict]:
    with db.writing() as s:
        item, a = served_item(s, j.item_id, user_id, ranking=False)
        existing = _existing_judgment(s, j.item_id, user_id)
        if existing is not None:
            return _resolve_duplicate(existing, j)
        likert, preferred, flags, quality = _stored_orientation(j, a.left_side)
        t = now()
        row = Judgment(item_id=item.id, user_id=user_id, left_side=a.left_side,
                       likert_shown=j.likert, likert=likert, preferred=preferred, flags=flags,
                       rating=j.rating, rationale=j.rationale, quality=quality, shown_at=a.shown_at,
                       created_at=t, seconds=max(0.0, t - a.shown_at))
        s.add(row)
        s.flush()  # raises IntegrityError here if a racing request got in first
        close_assignment(s, item, a, t)
        s.flush()
        return 201, judgment_to_json(row)


def _maybe_escalate(s, item: Item) -> None:
    """Once an item has its K judgments and they disagree, ask for ``extra_on_disagreement`` more."""
    if item.extra_on_disagreement <= 0 or item.escalated:
        return
    prefs = s.scalars(select(Judgment.preferred).where(Judgment.item_id == item.id)).all()
    if len(prefs) >= item.target and len(set(prefs)) > 1:
        item.target += item.extra_on_disagreement
        item.escalated += item.extra_on_disagreement


def escalate(db: Database, extra: int, max_agreement: float = 0.999) -> list[int]:
    """Send every complete item whose judgments disagree to ``extra`` more annotators.

    "Disagree": the share of judgments on the majority side is at most ``max_agreement``
    (by default: not unanimous). Returns the ids of the items escalated.
    """
    if extra < 1:
        raise LabelError(422, f"extra: must be >= 1 (got {extra})")
    done: list[int] = []
    with db.writing() as s:
        rows = s.execute(select(Judgment.item_id, Judgment.preferred)).all()
        votes: dict[int, list[str]] = {}
        for item_id, pref in rows:
            votes.setdefault(item_id, []).append(pref)
        for item_id, prefs in votes.items():
            if len(prefs) < 2:
                continue
            agreement = max(prefs.count("response_a"), prefs.count("response_b")) / len(prefs)
            if agreement > max_agreement:
                continue
            item = s.execute(select(Item).where(Item.id == item_id).with_for_update()).scalar_one()
            if len(prefs) < item.target:
                continue  # still collecting its judgments
            item.target += extra
            item.escalated += extra
            item.complete = int(item.judged >= item.target)
            done.append(item_id)
    return sorted(done)


def judgments_of(db: Database, user_id: int, limit: int = 1000) -> list[dict]:
    """This annotator's judgments, newest first, with the item's prompt for display."""
    with db.reading() as s:
        rows = s.execute(select(Judgment, Item).join(Item, Item.id == Judgment.item_id)
                         .where(Judgment.user_id == user_id)
                         .order_by(Judgment.id.desc()).limit(limit)).all()
        out = []
        for j, item in rows:
            d = judgment_to_json(j)
            d["conversation"] = item.conversation()
            out.append(d)
        return out


def count_judgments(db: Database, user_id: int | None = None) -> int:
    """Judgments of pairs plus rankings, of one annotator or of everyone."""
    total = 0
    with db.reading() as s:
        for table in (Judgment, Ranking):
            q = select(func.count(table.id))
            if user_id is not None:
                q = q.where(table.user_id == user_id)
            total += int(s.scalar(q) or 0)
    return total
