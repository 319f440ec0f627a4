"""``label import``: JSONL pairs to be judged.

Each line is one JSON object with the conversation and two responses:

* ``{"prompt": "...", "response_a": "...", "response_b": "..."}``, or
* ``{"messages": [{"role": "user", "content": "..."}, ...], "response_a": ..., "response_b": ...}``
  for a multi-turn conversation, which the two responses continue (a conversation that ends
  with an assistant turn is cut before it, as ``rlhfkit generate`` does, and that reply is kept
  in the metadata as ``reference_reply``), or
* the output of ``rlhfkit generate --samples-per-prompt 2``: ``prompt`` or ``messages`` plus
  ``"completions": [a, b]`` (strings, or objects with a ``text``/``content``/``completion``), or
* a ranking task: ``"completions"`` with 3 or 4 entries (``generate --samples-per-prompt 4``), which
  the annotator orders best to worst; ``--rank-pairs`` makes 2 completions a ranking task too.

Every other field is kept as the item's metadata and comes back in the export. The whole file is
checked first; any problem (reported as ``file:line: field 'x': message``) imports nothing.
Importing a record that is already in the database (same prompt and responses) adds nothing,
and a record with two identical responses (completions) is skipped (it can carry no preference, and the
trainers reject such pairs).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select

from rlhfkit.errors import InputError, record_problem
from rlhfkit.label.db import Database, Item, now

PROMPT_KEYS = ("prompt", "messages")
RESPONSE_KEYS = ("response_a", "response_b", "completions")
MAX_PROBLEMS = 50
MIN_K, MAX_K = 2, 4  # completions of a ranking task


@dataclass
class Pair:
    """A pair to compare, or with ``completions`` (K of them) a ranking task."""

    prompt: str | list[dict]
    response_a: str
    response_b: str
    metadata: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    completions: list[str] | None = None

    @classmethod
    def ranking(cls, prompt: str | list[dict], completions: list[str], **kw) -> Pair:
        return cls(prompt, completions[0], completions[1], completions=list(completions), **kw)

    @property
    def content_hash(self) -> str:
        content = [self.prompt, self.completions] if self.completions else [self.prompt, self.response_a,
                                                                            self.response_b]
        blob = json.dumps(content, ensure_ascii=False, sort_keys=True)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _completion_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        for key in ("text", "content", "completion"):
            if isinstance(value.get(key), str):
                return value[key]
    return None


def _check_messages(messages: Any) -> str | None:
    if not isinstance(messages, list) or not messages:
        return "expected a non-empty list of {\"role\", \"content\"} messages"
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return f"message {i}: expected an object with 'role' and 'content'"
        if not isinstance(m.get("role"), str) or not m["role"]:
            return f"message {i}: 'role' must be a non-empty string"
        if not isinstance(m.get("content"), str):
            return f"message {i}: 'content' must be a string"
    if all(m["role"] == "assistant" for m in messages):
        return "holds only assistant turns: there is nothing to respond to"
    return None


def _conversation(messages: list[dict], metadata: dict) -> list[dict]:
    """The turns the two responses continue. A finished conversation (its last turn the
    assistant's, as ``rlhfkit generate`` also accepts) is cut before that reply, which is kept in
    the metadata as ``reference_reply``."""
    turns = [{"role": m["role"], "content": m["content"]} for m in messages]
    while turns and turns[-1]["role"] == "assistant":
        metadata.setdefault("reference_reply", turns[-1]["content"])
        turns.pop()
    return turns


def _responses(record: dict, problem, problems: list[str], metadata: dict, rank_pairs: bool
               ) -> tuple[str | None, str | None, list[str] | None]:
    """(response_a, response_b, completions of a ranking task or None), appending any problems.

    ``completions`` of 3 or 4 make a ranking task; of 2, a pair (a ranking with ``rank_pairs``)."""
    if "completions" not in record:
        for key in ("response_a", "response_b"):
            if key not in record:
                problems.append(problem(key, "required (or give 'completions': [a, b, ...])"))
            elif not isinstance(record[key], str):
                problems.append(problem(key, f"expected a string, got {type(record[key]).__name__}"))
        return record.get("response_a"), record.get("response_b"), None
    if "response_a" in record or "response_b" in record:
        problems.append(problem("completions", "give 'completions' or 'response_a'/'response_b', not both"))
    comps = record["completions"]
    if not isinstance(comps, list) or not MIN_K <= len(comps) <= MAX_K:
        n = len(comps) if isinstance(comps, list) else type(comps).__name__
        problems.append(problem("completions", f"expected a list of {MIN_K} to {MAX_K} completions "
                                               f"(2: a pair to compare, 3 or 4: a ranking task), got {n}"))
        return None, None, None
    texts = [_completion_text(c) for c in comps]
    if any(t is None for t in texts):
        problems.append(problem("completions", "each completion must be a string or an object with a 'text' string"))
        return None, None, None
    extra = [{k: v for k, v in c.items() if k not in ("text", "content", "completion")}
             for c in comps if isinstance(c, dict)]
    if any(extra):
        metadata["completions_meta"] = extra
    ranking = len(texts) > 2 or rank_pairs
    return texts[0], texts[1], (texts if ranking else None)


def parse_record(record: Any, source: str, line: int, rank_pairs: bool = False) -> tuple[Pair | None, list[str]]:
    """One JSON value -> a Pair (or ranking task), or the problems with it."""
    def problem(field_name: str | None, message: str) -> str:
        return record_problem(source, line, field_name, message)

    if not isinstance(record, dict):
        return None, [problem(None, "expected a JSON object")]
    problems: list[str] = []
    metadata = {k: v for k, v in record.items() if k not in PROMPT_KEYS + RESPONSE_KEYS}
    prompt: Any = None
    if "messages" in record:
        msg_problem = _check_messages(record["messages"])
        if msg_problem:
            problems.append(problem("messages", msg_problem))
        else:
            prompt = _conversation(record["messages"], metadata)
        if "prompt" in record:
            metadata["prompt"] = record["prompt"]  # the messages are the conversation
    elif "prompt" in record:
        p = record["prompt"]
        if isinstance(p, list):
            msg_problem = _check_messages(p)
            if msg_problem:
                problems.append(problem("prompt", msg_problem))
            else:
                prompt = _conversation(p, metadata)
        elif not isinstance(p, str) or not p.strip():
            problems.append(problem("prompt", "expected a non-empty string or a list of messages"))
        else:
            prompt = p
    else:
        problems.append(problem(None, "needs 'prompt' (a string) or 'messages' (a list)"))

    a, b, completions = _responses(record, problem, problems, metadata, rank_pairs)
    if not problems:
        texts = [("completions", c) for c in completions] if completions else [("response_a", a), ("response_b", b)]
        if isinstance(prompt, str):
            texts.append(("prompt", prompt))
        else:
            key = "messages" if "messages" in record else "prompt"
            texts += [(key, m["content"]) for m in prompt]
        for key, text in texts:
            if "\x00" in text:
                problems.append(problem(key, "contains a NUL (\\u0000) character, which "
                                             "databases such as PostgreSQL cannot store"))
                break
    if problems:
        return None, problems
    return Pair(prompt=prompt, response_a=a, response_b=b, metadata=metadata,
                source=f"{Path(source).name}:{line}", completions=completions), []


def storable_text(text: str) -> str:
    """``text`` with each NUL character (which the importer refuses: PostgreSQL text cannot hold it)
    replaced by U+FFFD, for files rlhfkit writes from model output for people to label."""
    return text.replace("\x00", "\ufffd")


def read_pairs(path: str | Path, rank_pairs: bool = False) -> list[Pair]:
    """Read and check every record; raise InputError listing the problems (up to 50)."""
    path = Path(path)
    source = str(path)
    problems: list[str] = []
    pairs: list[Pair] = []
    try:
        fh = path.open(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{source}: no such file") from None
    except OSError as e:
        raise InputError(f"{source}: cannot read: {e.strerror}") from None
    with fh:
        try:
            for line_no, text in enumerate(fh, start=1):
                if not text.strip():
                    continue
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as e:
                    problems.append(record_problem(source, line_no, None, f"invalid JSON: {e.msg}"))
                    continue
                pair, rec_problems = parse_record(record, source, line_no, rank_pairs)
                problems += rec_problems
                if pair is not None:
                    pairs.append(pair)
        except UnicodeDecodeError:
            problems.append(f"{source}: not UTF-8 text")
    if problems:
        more = len(problems) - MAX_PROBLEMS
        shown = problems[:MAX_PROBLEMS] + ([f"... and {more} more problems"] if more > 0 else [])
        raise InputError(shown)
    if not pairs:
        raise InputError(f"{source}: no records")
    return pairs


@dataclass
class ImportResult:
    added: int
    already_present: int
    item_ids: list[int]
    identical: int = 0


def import_pairs(db: Database, pairs: list[Pair], overlap: int = 3,
                 extra_on_disagreement: int = 0) -> ImportResult:
    """Add the pairs as items wanting ``overlap`` judgments each, in one transaction."""
    if overlap < 1:
        raise InputError(f"--overlap must be >= 1 (got {overlap})")
    if extra_on_disagreement < 0:
        raise InputError(f"--extra-on-disagreement must be >= 0 (got {extra_on_disagreement})")
    added: list[int] = []
    skipped = identical = 0
    with db.writing() as s:
        hashes = [p.content_hash for p in pairs]
        present: set[str] = set()
        for i in range(0, len(hashes), 500):
            chunk = hashes[i:i + 500]
            present |= set(s.scalars(select(Item.content_hash).where(Item.content_hash.in_(chunk))))
        rows = []
        t = now()
        for pair, h in zip(pairs, hashes):
            texts = pair.completions or [pair.response_a, pair.response_b]
            if len(set(texts)) < len(texts):
                identical += 1
                continue
            if h in present:
                skipped += 1
                continue
            present.add(h)
            rows.append(Item(prompt=pair.prompt, response_a=pair.response_a,
                             response_b=pair.response_b, completions=pair.completions,
                             meta=pair.metadata, source=pair.source,
                             content_hash=h, overlap=overlap, target=overlap,
                             extra_on_disagreement=extra_on_disagreement, escalated=0,
                             judged=0, complete=0,
                             created_at=t))
        s.add_all(rows)
        s.flush()
        added = [r.id for r in rows]
    return ImportResult(added=len(added), already_present=skipped, item_ids=added,
                        identical=identical)
