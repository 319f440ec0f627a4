"""Errors that the CLI turns into exit code 2 with one line per problem and no traceback."""

from __future__ import annotations


class InputError(Exception):
    """Bad user input: a config value, a data record, a file.

    Each problem is one line; data problems name the file, the record (line) number and the
    field, e.g. ``pairs.jsonl:7: field 'chosen': expected a string or a list of messages``.
    """

    def __init__(self, problems: list[str] | str):
        # identical lines once: a record drawn twice into a mixture has its problems once
        self.problems = [problems] if isinstance(problems, str) else list(dict.fromkeys(problems))
        super().__init__("\n".join(self.problems))


def record_problem(source: str, line: int | None, field: str | None, message: str) -> str:
    """Format one data problem as ``file:line: field 'x': message``."""
    where = f"{source}:{line}" if line is not None else source
    what = f" field '{field}':" if field else ""
    return f"{where}:{what} {message}"
