"""The label database: tables, engine and sessions (portable SQLAlchemy: SQLite or PostgreSQL).

Tables
------
``users``        annotators and admins; only the sha256 of each token is stored.
``web_sessions`` browser sessions created by ``/?token=...`` (only the hash of the cookie value).
``items``        one pair of responses to one conversation (or, for a ranking task, the K
                 completions in ``completions``, the first two also in ``response_a``/``_b``),
                 with ``target``: how many annotators should judge it (``--overlap K`` at import,
                 plus extra annotators when its judgments disagree).
``assignments``  an item served to one annotator: which stored response was shown on the left
                 (randomised per annotator and item; for a ranking task the whole display order,
                 ``display_order``), when it was served, and its state
                 (``open``, ``done``, ``skipped``). Unique on (item, user): nobody sees an item twice.
``rankings``     a ranking task's judgments: one per (item, annotator) (unique), the order shown
                 (completion indices, first = shown as A) and the ranking given (completion
                 indices, best first). Only ever inserted, like ``judgments``.
``judgments``    one judgment per (item, annotator), enforced by a unique constraint. The Likert
                 point is stored both as shown (1 = left much better) and in stored orientation
                 (1 = ``response_a`` much better), with the left side and the seconds spent, and
                 optionally each response's own quality, good or bad (``quality``).
                 Rows are only ever inserted: nothing in rlhfkit updates or deletes a judgment.

SQLite
------
A plain path becomes ``sqlite:///PATH`` in WAL mode with a 30 s busy timeout. Every transaction
that writes starts with ``BEGIN IMMEDIATE`` so two writers never deadlock on a lock upgrade (a
deferred transaction that reads and then writes can fail at once with "database is locked");
read-only transactions start with a plain ``BEGIN`` and run beside the writer. On PostgreSQL the
same code locks the item row (``SELECT ... FOR UPDATE``) where it counts judgments and writes.

Schema versions
---------------
Version 2 added ``items.completions``, ``assignments.display_order`` (nullable JSON) and the
``rankings`` table. Opening a version-1 database adds them (``ALTER TABLE ... ADD COLUMN`` of a
nullable column: no row is rewritten, every existing item stays a pair). Version 3 added
``judgments.quality`` the same way.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import (
    JSON,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    inspect,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.pool import StaticPool

SCHEMA_VERSION = 3

# The per-response flags of the judging page, in display order, with their labels.
FLAGS: dict[str, str] = {
    "hallucination": "Hallucination",
    "harmful": "Harmful",
    "fails_task": "Fails the task",
    "refusal": "Refusal",
    "not_english": "Not English",
    "personal_data": "Contains personal data",
}

# The 8-point scale as shown: 1 = the left answer (A) is much better ... 8 = the right one (B).
SCALE: list[str] = [
    "A is much better", "A is better", "A is slightly better", "A is marginally better",
    "B is marginally better", "B is slightly better", "B is better", "B is much better",
]

SIDES = ("response_a", "response_b")


def now() -> float:
    """Timestamps are seconds since the epoch (a float): portable and easy to do arithmetic on."""
    return time.time()


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    """A random 32-byte token, URL-safe (43 characters)."""
    return secrets.token_urlsafe(32)


class Base(DeclarativeBase):
    type_annotation_map = {dict: JSON, list: JSON}


class Meta(Base):
    __tablename__ = "label_meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(255))


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    role: Mapped[str] = mapped_column(String(16))  # annotator | admin
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[float] = mapped_column(Float, default=now)

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


class WebSession(Base):
    __tablename__ = "web_sessions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    session_hash: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    created_at: Mapped[float] = mapped_column(Float, default=now)


class Item(Base):
    __tablename__ = "items"
    __table_args__ = (Index("ix_items_complete_id", "complete", "id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # The prompt as imported: a string, or a list of {"role", "content"} messages.
    prompt: Mapped[object] = mapped_column(JSON)
    response_a: Mapped[str] = mapped_column(Text)
    response_b: Mapped[str] = mapped_column(Text)
    meta: Mapped[dict] = mapped_column("metadata", JSON, default=dict)
    # A ranking task's K completions (2 <= K <= 4); None for a pair.
    completions: Mapped[list | None] = mapped_column(JSON, nullable=True, default=None)
    source: Mapped[str] = mapped_column(String(1000), default="")
    # sha256 of (prompt, response_a, response_b): importing the same record twice adds nothing.
    content_hash: Mapped[str] = mapped_column(String(64), unique=True)
    overlap: Mapped[int] = mapped_column(Integer)          # K annotators asked for at import
    target: Mapped[int] = mapped_column(Integer)           # K, plus extra ones after disagreement
    extra_on_disagreement: Mapped[int] = mapped_column(Integer, default=0)
    escalated: Mapped[int] = mapped_column(Integer, default=0)  # extra annotators added so far
    # Kept up to date under the item's lock: judgments so far, and 1 once judged >= target
    # (the queue only looks at incomplete items, so it stays fast as the job progresses).
    judged: Mapped[int] = mapped_column(Integer, default=0)
    complete: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[float] = mapped_column(Float, default=now)

    def conversation(self) -> list[dict]:
        if isinstance(self.prompt, str):
            return [{"role": "user", "content": self.prompt}]
        return list(self.prompt)

    def text(self, side: str) -> str:
        return self.response_a if side == "response_a" else self.response_b

    @property
    def is_ranking(self) -> bool:
        return self.completions is not None


class Assignment(Base):
    __tablename__ = "assignments"
    __table_args__ = (UniqueConstraint("item_id", "user_id", name="uq_assignment_item_user"),
                      Index("ix_assignment_user_status", "user_id", "status"),
                      Index("ix_assignment_item_status", "item_id", "status"))
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    left_side: Mapped[str] = mapped_column(String(16))  # response_a | response_b
    # A ranking task: the completion indices in the order shown (first = shown as A).
    display_order: Mapped[list | None] = mapped_column(JSON, nullable=True, default=None)
    status: Mapped[str] = mapped_column(String(16), default="open")  # open | done | skipped
    shown_at: Mapped[float] = mapped_column(Float, default=now)
    closed_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class Judgment(Base):
    __tablename__ = "judgments"
    __table_args__ = (UniqueConstraint("item_id", "user_id", name="uq_judgment_item_user"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    left_side: Mapped[str] = mapped_column(String(16))   # which stored response was on the left
    likert_shown: Mapped[int] = mapped_column(Integer)   # 1 = left much better ... 8 = right
    likert: Mapped[int] = mapped_column(Integer)         # 1 = response_a much better ... 8 = b
    preferred: Mapped[str] = mapped_column(String(16))   # response_a | response_b
    flags: Mapped[dict] = mapped_column(JSON, default=dict)  # {"response_a": [...], ...}
    rating: Mapped[str | None] = mapped_column(String(8), nullable=True)  # good | bad | None
    # Each response on its own, good or bad (the rated ones only): {"response_a": "good", ...}.
    quality: Mapped[dict | None] = mapped_column(JSON, nullable=True, default=None)
    rationale: Mapped[str] = mapped_column(Text, default="")
    shown_at: Mapped[float] = mapped_column(Float)
    created_at: Mapped[float] = mapped_column(Float, default=now)
    seconds: Mapped[float] = mapped_column(Float)         # created_at - shown_at

    @property
    def left_won(self) -> bool:
        return self.preferred == self.left_side


class Ranking(Base):
    """One annotator's ranking of a ranking task's K completions."""

    __tablename__ = "rankings"
    __table_args__ = (UniqueConstraint("item_id", "user_id", name="uq_ranking_item_user"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    display_order: Mapped[list] = mapped_column(JSON)    # completion indices as shown (A, B, ...)
    ranking_shown: Mapped[list] = mapped_column(JSON)    # labels as given, best first: ["C", "A", "B"]
    ranking: Mapped[list] = mapped_column(JSON)          # completion indices, best first
    flags: Mapped[dict] = mapped_column(JSON, default=dict)  # {"0": [...], ...} by completion index
    rating: Mapped[str | None] = mapped_column(String(8), nullable=True)  # good | bad | None
    rationale: Mapped[str] = mapped_column(Text, default="")
    shown_at: Mapped[float] = mapped_column(Float)
    created_at: Mapped[float] = mapped_column(Float, default=now)
    seconds: Mapped[float] = mapped_column(Float)


# --------------------------------------------------------------------------------------------
# Engine and sessions
# --------------------------------------------------------------------------------------------


def database_url(db: str) -> str:
    """``--db``: a SQLAlchemy URL, or a plain file path meaning a SQLite file."""
    if "://" in db:
        return db
    return "sqlite:///" + os.path.abspath(os.path.expanduser(db))


def make_engine(db: str, create: bool = True) -> Engine:
    """Open (and by default create the tables of) the label database named by ``db``."""
    url = make_url(database_url(db))
    if url.get_backend_name() == "sqlite":
        memory = url.database in (None, "", ":memory:")
        pool = ({"poolclass": StaticPool} if memory  # one shared connection, or every one is empty
                else {"pool_size": 20, "max_overflow": 20, "pool_timeout": 60})
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, **pool)

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn, _record):
            # Let SQLAlchemy's "begin" event emit BEGIN itself (pysqlite's own handling defers it).
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            if not memory:
                cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn):
            immediate = conn.get_execution_options().get("label_write", False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")
    else:
        engine = create_engine(url, pool_pre_ping=True, pool_size=20, max_overflow=20,
                               pool_timeout=60)
    if create:
        create_schema(engine)
    return engine


def create_schema(engine: Engine) -> None:
    Base.metadata.create_all(engine)
    _add_missing_columns(engine)
    with Session(engine) as s, s.begin():
        version = s.get(Meta, "schema_version")
        if version is None:
            s.add(Meta(key="schema_version", value=str(SCHEMA_VERSION)))
        elif int(version.value) < SCHEMA_VERSION:
            version.value = str(SCHEMA_VERSION)


def _add_missing_columns(engine: Engine) -> None:
    """Bring an older database up to date: add the nullable columns a later version introduced."""
    present = inspect(engine)
    with engine.connect().execution_options(label_write=True) as conn:
        for table in Base.metadata.sorted_tables:
            have = {c["name"] for c in present.get_columns(table.name)}
            for column in table.columns:
                if column.name not in have and column.nullable:
                    kind = column.type.compile(dialect=engine.dialect)
                    conn.exec_driver_sql(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}')
        conn.commit()


class Database:
    """An engine plus session factories: ``reading()`` and ``writing()`` context managers."""

    def __init__(self, db: str | Engine, create: bool = True):
        self.engine = db if isinstance(db, Engine) else make_engine(db, create=create)
        self._factory = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def reading(self) -> Iterator[Session]:
        """A read-only transaction; closing the session ends it (objects stay readable)."""
        with self._factory() as s:
            yield s

    @contextmanager
    def writing(self) -> Iterator[Session]:
        """A transaction that writes (``BEGIN IMMEDIATE`` on SQLite), committed on success.

        After an error the session is rolled back; start a new ``writing()`` to retry (a
        session's next transaction would not be IMMEDIATE).
        """
        with self._factory() as s:
            s.connection(execution_options={"label_write": True})
            try:
                yield s
                s.commit()
            except BaseException:
                s.rollback()
                raise

    def dispose(self) -> None:
        self.engine.dispose()
