"""Live tasks: the annotator writes a user turn, two model replies come back, the annotator picks.

``rlhfkit label serve --live-url URL --live-model NAME`` (given once: two replies sampled from
that model; given twice: one reply from each) asks OpenAI-compatible endpoints (``rlhfkit serve``,
vLLM, a hosted API) through :class:`rlhfkit.models.backends.OpenAIChatBackend`; the API key is read
from the environment variable ``--live-api-key-env`` names, and never stored.

Each turn becomes an ordinary pair item, created already assigned to the annotator who wrote
it (and to no one else: it is never in the shared queue), and its judgment is an ordinary
``POST /api/judgments``: the same exactly-once guarantee, the same export. The item keeps the
conversation so far as its prompt (a list of messages) and, in its metadata, ``live`` (the
conversation's id, the turn number) and ``model_a``/``model_b``: the models that wrote
``response_a``/``response_b``, which the battles export and the per-model win rates read. The
next turn continues from the reply the annotator preferred: the client names the judged item
(``after_item``) and the server rebuilds the conversation from the database, so what is stored
is exactly what the models were shown.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from rlhfkit.label.db import SIDES, Assignment, Database, Item, Judgment, now
from rlhfkit.label.service import MAX_RATIONALE, LabelError, Served
from rlhfkit.models.backends import BackendError, OpenAIChatBackend, endpoint_label

SAME_REPLY_RETRIES = 2  # one model sampled twice may repeat itself: ask again this often


@dataclass
class LiveModels:
    """The endpoint(s) the live page asks: ``(name, backend)`` for one model or two."""

    models: list[tuple[str, Any]]
    temperature: float = 0.8
    max_tokens: int = 256

    @classmethod
    def from_flags(cls, urls: list[str], names: list[str], api_key: str | None, temperature: float,
                   max_tokens: int, timeout: float = 120.0) -> LiveModels:
        backends = [OpenAIChatBackend(u, n, api_key=api_key, timeout=timeout, role="live model", retries=1)
                    for u, n in zip(urls, names)]
        labels = list(names)
        if len(set(labels)) < len(labels):  # two endpoints serving models of the same name
            labels = [endpoint_label(u, n) for u, n in zip(urls, names)]
        return cls(list(zip(labels, backends)), temperature, max_tokens)

    def names(self) -> tuple[str, str]:
        return (self.models[0][0], self.models[-1][0])

    def two_replies(self, conversation: list[dict]) -> list[str]:
        """Two different replies to ``conversation``: one per model, or two samples of the one model."""
        backends = [self.models[0][1], self.models[-1][1]]
        for _ in range(SAME_REPLY_RETRIES + 1):
            with ThreadPoolExecutor(2) as pool:
                futures = [pool.submit(b.complete, [conversation], self.temperature, self.max_tokens)
                           for b in backends]
                try:
                    texts = [f.result()[0] for f in futures]
                except BackendError as e:
                    raise LabelError(502, f"the model could not answer: {e}") from None
            if texts[0] != texts[1]:
                return texts
        raise LabelError(502, "the two replies were identical (there is nothing to choose): "
                              "raise --live-temperature, or give a second --live-url")

    def close(self) -> None:
        for _, backend in self.models:
            backend.close()


def parse_turn(body: Any) -> tuple[str, int | None]:
    """A POST /api/live/turn body -> (the user's text, the judged item it continues or None)."""
    if not isinstance(body, dict):
        raise LabelError(422, 'the body must be a JSON object like {"user": "Hello!", "after_item": 12}')
    problems = [f"unknown field {k!r} (expected after_item, user)" for k in body if k not in ("user", "after_item")]
    user = body.get("user")
    if not isinstance(user, str) or not user.strip():
        problems.append("user: required, the user turn (a non-empty string)")
    elif "\x00" in user or len(user) > MAX_RATIONALE:
        problems.append(f"user: at most {MAX_RATIONALE} characters, without NUL (\\u0000)")
    after = body.get("after_item")
    if after is not None and (isinstance(after, bool) or not isinstance(after, int)):
        problems.append(f"after_item: an integer, the item whose preferred reply this turn follows (got {after!r})")
    if problems:
        raise LabelError(422, "; ".join(problems), problems=problems)
    return user, after


def conversation_for(db: Database, user_id: int, user_text: str, after_item: int | None
                     ) -> tuple[list[dict], dict]:
    """The messages the models are shown, and the ``live`` metadata of the new turn."""
    turn = {"role": "user", "content": user_text}
    if after_item is None:
        return [turn], {"conversation": None, "turn": 1}
    with db.reading() as s:
        item = s.get(Item, after_item)
        judgment = s.scalars(select(Judgment).where(Judgment.item_id == after_item,
                                                    Judgment.user_id == user_id)).first()
    live = (item.meta or {}).get("live") if item is not None else None
    if live is None or judgment is None:
        raise LabelError(409, f"after_item {after_item}: not a live turn you have judged")
    chosen = {"role": "assistant", "content": item.text(judgment.preferred)}
    return item.conversation() + [chosen, turn], {"conversation": live["conversation"], "turn": live["turn"] + 1}


def start_turn(db: Database, models: LiveModels, user_id: int, user_text: str, after_item: int | None,
               rng: secrets.SystemRandom | None = None) -> Served:
    """Ask for two replies and store the turn as an item served to ``user_id`` (only)."""
    rng = rng or secrets.SystemRandom()
    conversation, live = conversation_for(db, user_id, user_text, after_item)
    reply_a, reply_b = models.two_replies(conversation)
    model_a, model_b = models.names()
    nonce = secrets.token_hex(8)  # the same words twice are still two turns
    digest = hashlib.sha256(json.dumps([conversation, reply_a, reply_b, nonce]).encode()).hexdigest()
    t = now()
    with db.writing() as s:
        item = Item(prompt=conversation, response_a=reply_a, response_b=reply_b, source="live",
                    meta={"live": live, "model_a": model_a, "model_b": model_b}, content_hash=digest,
                    overlap=1, target=1, extra_on_disagreement=0, escalated=0, judged=0, complete=1,
                    created_at=t)
        s.add(item)
        s.flush()
        if live["conversation"] is None:
            live = {**live, "conversation": item.id}  # a conversation is named by its first turn
            item.meta = {**item.meta, "live": live}
        a = Assignment(item_id=item.id, user_id=user_id, left_side=rng.choice(SIDES), status="open", shown_at=t)
        s.add(a)
        s.flush()
        return Served(a, item)


def served_turn_json(served: Served) -> dict:
    """What the live page is sent: the turn as any served pair, with its place in the conversation
    (model names stay hidden until the vote, as in a blind arena)."""
    out = served.to_json()
    out["live"] = served.item.meta["live"]
    return out
