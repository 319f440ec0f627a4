"""The one length policy: what a command does with an example longer than its length limit.

``truncate`` (the default) keeps the example, cut by its encoder (prompts lose their first
tokens, then completions their last ones: :func:`rlhfkit.data.chat.encode`); ``drop`` skips
it. Every command (sft, rm, dpo, ppo, eval-rm) counts both and prints one line in one wording,
:func:`length_report`; a file whose every example is dropped is an input error.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Literal, TypeVar

from rlhfkit.errors import InputError

Truncation = Literal["truncate", "drop"]
Example = TypeVar("Example")
Encoded = TypeVar("Encoded")


class ExampleError(ValueError):
    """An example that cannot be used, with the record field at fault (``None``: the whole record)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def length_report(source: str, truncated: int, dropped: int, limit: str, truncation: str) -> str:
    """``pairs.jsonl: 2 example(s) truncated and 1 dropped at --max-length 512 (policy: truncate)``."""
    return f"{source}: {truncated} example(s) truncated and {dropped} dropped at {limit} (policy: {truncation})"


def _problem(example, error: ValueError) -> str:
    record = getattr(example, "source", None)
    return record.problem(getattr(error, "field", None), str(error)) if record is not None else str(error)


def apply_length_policy(examples: Iterable[Example], encode: Callable[[Example], tuple[Encoded | None, bool]], *,
                        source: str, max_length: int, truncation: str, limit: str | None = None,
                        say: Callable[[str], None] | None = None) -> list[Encoded]:
    """The examples encoded under the length policy, in order, without the dropped ones.

    ``encode(example) -> (encoded, over)``: ``over`` says the example is longer than the limit;
    under ``drop`` it is skipped (``encoded`` may then be None), under ``truncate`` its
    ``encoded`` form (already cut) is kept. A ``ValueError`` (an :class:`ExampleError` names the
    field) is a problem of that example: every problem is collected and raised as one
    :class:`InputError` naming file and record. ``say`` receives :func:`length_report`'s line
    when anything was truncated or dropped; ``limit`` is how the line names the limit
    (default ``--max-length N``).
    """
    limit = limit or f"--max-length {max_length}"
    kept, problems, truncated, dropped = [], [], 0, 0
    for example in examples:
        try:
            encoded, over = encode(example)
        except ValueError as e:
            problems.append(_problem(example, e))
            continue
        if over and truncation == "drop":
            dropped += 1
            continue
        truncated += bool(over)
        kept.append(encoded)
    if problems:
        raise InputError(problems)
    if not kept and dropped:
        raise InputError(f"{source}: every example is longer than {limit} and was dropped")
    if (truncated or dropped) and say is not None:
        say(length_report(source, truncated, dropped, limit, truncation))
    return kept
