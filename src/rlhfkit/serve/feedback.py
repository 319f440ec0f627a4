"""Deployment feedback: the chat completions ``rlhfkit serve --feedback-db`` returned, people's
thumbs up/down on them, and ``rlhfkit feedback export`` into training data.

Tables (beside the label app's, through the same engine and sessions: :mod:`rlhfkit.label.db`)
------
``feedback_completions``  one row per returned choice: the completion id the client got, the
                          choice index, the served model id, the request's messages, the text and
                          finish reason, the sampling parameters used, and when it was stored.
                          Unique on (completion id, choice index).
``feedback_ratings``      every rating ever posted: the choice it rates, ``up`` or ``down``, an
                          optional comment and its time. Rows are only inserted; a second rating
                          of the same choice is a new row, and the latest one (by insertion
                          order) is the one exported. Nothing is overwritten, so a changed mind
                          stays visible in the database.

Model output is untrusted text: it is stored and exported as-is, never evaluated or rendered.

Export formats (``--format``)
------
``kto``      TRL's unpaired-preference records ``{prompt, completion, label}``: the prompt as
             messages, the completion as one assistant message, ``label`` true for up, false for
             down (each rated choice once, with its latest rating).
``sft``      the up-rated conversations as ``{"messages": [..., assistant reply]}``.
``prompts``  every distinct logged prompt as ``{"prompt": messages}``, in first-seen order (the
             next round's RL prompts), rated or not.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import JSON, Float, ForeignKey, Integer, String, Text, UniqueConstraint, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from starlette.concurrency import run_in_threadpool

from rlhfkit.config import arg, validated
from rlhfkit.errors import InputError
from rlhfkit.label.db import Database, make_engine, now

log = logging.getLogger("rlhfkit.serve")

FEEDBACK_DB_HELP = ("Store every chat completion returned, and accept ratings at POST /v1/feedback: a SQLAlchemy "
                    "URL (e.g. postgresql+psycopg://user@host/feedback) or a file path for SQLite (WAL mode).")


class FeedbackBase(DeclarativeBase):
    type_annotation_map = {dict: JSON, list: JSON}


class LoggedCompletion(FeedbackBase):
    __tablename__ = "feedback_completions"
    __table_args__ = (UniqueConstraint("completion_id", "choice_index", name="uq_feedback_completion_choice"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    completion_id: Mapped[str] = mapped_column(String(100), index=True)  # "chatcmpl-..." as returned
    choice_index: Mapped[int] = mapped_column(Integer)
    model: Mapped[str] = mapped_column(String(1000))
    messages: Mapped[list] = mapped_column(JSON)           # [{"role", "content"}, ...] as the model saw them
    completion: Mapped[str] = mapped_column(Text)          # the assistant reply, untrusted text
    finish_reason: Mapped[str] = mapped_column(String(16))
    sampling: Mapped[dict] = mapped_column(JSON)           # SamplingParams used, as a dict
    created_at: Mapped[float] = mapped_column(Float, default=now)


class Rating(FeedbackBase):
    __tablename__ = "feedback_ratings"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    completion_row: Mapped[int] = mapped_column(ForeignKey("feedback_completions.id"), index=True)
    rating: Mapped[str] = mapped_column(String(8))         # up | down
    comment: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[float] = mapped_column(Float, default=now)


class FeedbackStore:
    """The feedback tables of one database (``db``: a file path for SQLite, or a SQLAlchemy URL)."""

    def __init__(self, db: str):
        self.db = Database(make_engine(db, create=False))  # the label app's engine and session rules
        FeedbackBase.metadata.create_all(self.db.engine)

    def log_chat(self, completion_id: str, model: str, messages: list[dict], sampling, completions) -> None:
        """Store one returned chat completion: a row per choice (``completions`` in choice order)."""
        params = dataclasses.asdict(sampling) if dataclasses.is_dataclass(sampling) else dict(sampling)
        with self.db.writing() as s:
            s.add_all([LoggedCompletion(completion_id=completion_id, choice_index=i, model=model,
                                        messages=list(messages), completion=c.text,
                                        finish_reason=c.finish_reason, sampling=params)
                       for i, c in enumerate(completions)])

    def rate(self, completion_id: str, index: int, rating: str, comment: str | None) -> Rating | None:
        """Record a rating of choice ``index`` of ``completion_id``; None when no such choice was logged."""
        with self.db.writing() as s:
            row = s.scalar(select(LoggedCompletion.id).where(LoggedCompletion.completion_id == completion_id,
                                                             LoggedCompletion.choice_index == index))
            if row is None:
                return None
            stored = Rating(completion_row=row, rating=rating, comment=comment)
            s.add(stored)
        return stored

    def counts(self) -> dict[str, int]:
        """Rows in each table, and ratings by value (``up``, ``down``)."""
        with self.db.reading() as s:
            out = {"completions": s.scalar(select(func.count(LoggedCompletion.id))),
                   "ratings": s.scalar(select(func.count(Rating.id)))}
            for value, n in s.execute(select(Rating.rating, func.count(Rating.id)).group_by(Rating.rating)):
                out[value] = n
        return out

    def latest_ratings(self) -> Iterator[tuple[LoggedCompletion, Rating]]:
        """Each rated choice with its latest rating, in the order the choices were stored."""
        latest = select(func.max(Rating.id)).group_by(Rating.completion_row).scalar_subquery()
        query = (select(LoggedCompletion, Rating).join(Rating, Rating.completion_row == LoggedCompletion.id)
                 .where(Rating.id.in_(latest)).order_by(LoggedCompletion.id))
        with self.db.reading() as s:
            yield from (tuple(row) for row in s.execute(query))

    def prompts(self) -> Iterator[list[dict]]:
        """The messages of every logged request, in the order they were stored."""
        query = select(LoggedCompletion.messages).where(LoggedCompletion.choice_index == 0) \
            .order_by(LoggedCompletion.id)
        with self.db.reading() as s:
            yield from s.scalars(query)

    def dispose(self) -> None:
        self.db.dispose()


def open_store(db: str) -> FeedbackStore:
    """The store named by ``--feedback-db`` / ``--db``; a database that cannot be opened is an InputError."""
    from sqlalchemy.exc import SQLAlchemyError

    try:
        return FeedbackStore(db)
    except (SQLAlchemyError, ImportError) as e:
        raise InputError(f"{db}: cannot open the feedback database: {str(e).splitlines()[0]}") from None


def record_chat(store: FeedbackStore, completion_id: str, model: str, messages: list[dict], sampling,
                completions) -> None:
    """Log a returned chat completion; a database failure is logged, and the client still gets its answer."""
    try:
        store.log_chat(completion_id, model, messages, sampling, completions)
    except Exception:  # noqa: BLE001 - serving must not fail because the feedback log did
        log.exception("could not store chat completion %s in the feedback database", completion_id)


# ------------------------------------------------------------------------------ POST /v1/feedback
class FeedbackRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    id: str = Field(min_length=1, max_length=100)
    rating: Literal["up", "down"]
    comment: str | None = None
    index: int = Field(0, ge=0)  # which choice of an n > 1 completion (rlhfkit extension)


feedback_router = APIRouter()


@feedback_router.post("/v1/feedback")
async def post_feedback(request: Request):
    """Rate a logged chat completion: 200 with the stored rating, 404 for an unknown id (or choice),
    422 for a body that is not ``{"id": str, "rating": "up"|"down", "comment"?: str, "index"?: int}``."""
    from rlhfkit.serve.protocol import APIError
    from rlhfkit.serve.server import _validation_response

    try:
        req = FeedbackRequest.model_validate_json(await request.body())
    except ValidationError as e:
        return _validation_response(e.errors(), status=422)
    store: FeedbackStore = request.app.state.feedback
    stored = await run_in_threadpool(store.rate, req.id, req.index, req.rating, req.comment)
    if stored is None:
        which = f"'{req.id}'" + (f" (choice {req.index})" if req.index else "")
        raise APIError(404, f"no chat completion {which} is logged on this server", "id", "completion_not_found")
    return JSONResponse({"object": "feedback", "id": req.id, "index": req.index, "rating": req.rating,
                         "comment": req.comment, "created": stored.created_at})


# ------------------------------------------------------------------------------ rlhfkit feedback export
def export_records(store: FeedbackStore, format: str) -> Iterator[dict]:
    """The store's feedback as records of ``format`` (kto, sft or prompts; see the module docstring)."""
    if format == "prompts":
        seen: set[str] = set()
        for messages in store.prompts():
            key = json.dumps(messages, sort_keys=True, ensure_ascii=False)
            if key not in seen:
                seen.add(key)
                yield {"prompt": messages}
        return
    for logged, rating in store.latest_ratings():
        reply = {"role": "assistant", "content": logged.completion}
        if format == "kto":
            yield {"prompt": logged.messages, "completion": [reply], "label": rating.rating == "up"}
        elif rating.rating == "up":
            yield {"messages": [*logged.messages, reply]}


@dataclass
class ExportConfig:
    """Write the feedback logged by `rlhfkit serve --feedback-db` as training data."""

    db: str = arg("", "The feedback database given to `rlhfkit serve --feedback-db` (file path or SQLAlchemy URL).")
    output: str = arg("", "Output .jsonl file.")
    format: Literal["kto", "sft", "prompts"] = arg(
        "kto", "kto: {prompt, completion, label} per rated reply (TRL's unpaired format; up = true); sft: the "
               "up-rated conversations as {messages}; prompts: every distinct logged prompt as {prompt}.")

    def validate(self) -> list[str]:
        from rlhfkit.label.commands import db_problems

        problems = db_problems(self.db)
        if not problems and "://" not in self.db and not os.path.isfile(self.db):
            problems.append(f"--db: no such file: {self.db}")
        if not self.output:
            problems.append("--output is required")
        return problems


def export(cfg: ExportConfig) -> int:
    from rlhfkit.data.io import write_jsonl

    store = open_store(validated(cfg).db)
    written = 0

    def counted(records):
        nonlocal written
        for r in records:
            written += 1
            yield r

    try:
        write_jsonl(cfg.output, counted(export_records(store, cfg.format)))
        counts = store.counts()
    finally:
        store.dispose()
    print(f"wrote {written} {cfg.format} records to {cfg.output} ({counts['completions']} replies logged, "
          f"{counts['ratings']} ratings: {counts.get('up', 0)} up, {counts.get('down', 0)} down)")
    return 0
