"""Evaluation inputs and outputs: JSON/JSONL records, markdown reports and plots.

Every evaluation command writes a machine-readable JSON file and a human-readable markdown
report, plus a PNG where a picture says more than a table. These helpers keep the outputs
uniform across commands:

* :func:`write_json` / :func:`write_text`: atomic writes (and ``rlhfkit.data.io.write_jsonl``);
  :class:`JsonlWriter` appends as it goes. ``NaN`` and infinities become ``null`` (strict
  JSON), numpy scalars become plain numbers (``rlhfkit.data.io.to_jsonable``).
* :func:`read_json_records`: a JSON list or a JSONL file as (record number, value) pairs, for
  validation messages that name ``file:record``.
* :func:`md_escape`, :func:`md_table`, :func:`md_code_block`: markdown that cannot be broken
  by untrusted text (model outputs may contain pipes, newlines, backticks or HTML).
* :func:`new_figure` / :func:`save_figure`: matplotlib figures on the Agg canvas, without
  touching pyplot's global state (safe in tests, servers and threads).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from rlhfkit.data.io import atomic_open, to_jsonable
from rlhfkit.errors import InputError, record_problem

# --------------------------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------------------------


def _atomic_write(path: str | os.PathLike, text: str) -> Path:
    with atomic_open(path) as f:
        f.write(text)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> Path:
    """Write ``obj`` as strict JSON (atomically)."""
    return _atomic_write(path, json.dumps(to_jsonable(obj), indent=indent, ensure_ascii=False,
                                          allow_nan=False) + "\n")


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a text file (atomically)."""
    return _atomic_write(path, text)


class JsonlWriter:
    """Append records to a JSONL file as they are produced (flushed after each write).

    Used for raw judge outputs so that a run that fails half-way keeps what it already paid
    for. Opening truncates the file.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "w", encoding="utf-8")
        self.count = 0

    def write(self, record: Any) -> None:
        self._fh.write(json.dumps(to_jsonable(record), ensure_ascii=False, allow_nan=False) + "\n")
        self._fh.flush()
        self.count += 1

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def cap_problems(problems: list[str], limit: int = 50) -> list[str]:
    """At most ``limit`` problem lines, then one line saying how many more there were."""
    if len(problems) > limit:
        return problems[:limit] + [f"... and {len(problems) - limit} more problems"]
    return list(problems)


def read_json_records(path: str | os.PathLike) -> list[tuple[int, Any]]:
    """(record number, value) pairs from a JSON list or a JSONL file.

    Record numbers are line numbers for JSONL and 1-based positions for a JSON list.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e.reason})") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
        return list(enumerate(data, start=1))
    records: list[tuple[int, Any]] = []
    problems: list[str] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((lineno, json.loads(line)))
        except json.JSONDecodeError as e:
            problems.append(record_problem(str(path), lineno, None, f"invalid JSON: {e.msg}"))
    if problems:
        raise InputError(cap_problems(problems))
    return records


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------

_NEWLINES = re.compile(r"\r\n|\r|\n")


def md_escape(text: Any, max_len: int | None = None) -> str:
    """Make arbitrary (untrusted) text safe for one markdown table cell.

    HTML-significant characters become entities (no raw HTML reaches a renderer), pipes are
    escaped, backslashes doubled, newlines become ``<br>`` and the text is optionally cut to
    ``max_len`` characters (with an ellipsis) before escaping.
    """
    s = "" if text is None else str(text)
    if max_len is not None and len(s) > max_len:
        s = s[: max(0, max_len - 1)] + "…"
    s = s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    s = s.replace("\\", "\\\\").replace("|", "\\|").replace("`", "\\`")
    s = s.replace("*", "\\*").replace("_", "\\_").replace("[", "\\[").replace("]", "\\]")
    return _NEWLINES.sub("<br>", s)


def fmt_num(x: Any, digits: int = 1, missing: str = "—") -> str:
    """Format a number for a table; ``None``/NaN become ``missing``."""
    if x is None:
        return missing
    try:
        xf = float(x)
    except (TypeError, ValueError):
        return md_escape(x)
    if not math.isfinite(xf):
        return missing
    return f"{xf:.{digits}f}"


def fmt_pct(x: Any, digits: int = 1, missing: str = "—") -> str:
    """Format a fraction in [0, 1] as a percentage."""
    if x is None:
        return missing
    try:
        xf = float(x)
    except (TypeError, ValueError):
        return missing
    return missing if not math.isfinite(xf) else f"{100 * xf:.{digits}f}%"


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]],
             align: Sequence[str] | None = None) -> str:
    """A GitHub-flavoured markdown table.

    Cells are used as given (escape untrusted text with :func:`md_escape` first; numbers with
    :func:`fmt_num`); ``align`` holds ``"l"``/``"r"``/``"c"`` per column (numbers: ``r``).
    """
    marks = {"l": ":---", "r": "---:", "c": ":---:"}
    align = list(align) if align else ["l"] * len(headers)
    lines = ["| " + " | ".join(str(h) for h in headers) + " |",
             "| " + " | ".join(marks.get(a, "---") for a in align) + " |"]
    for row in rows:
        cells = [str(c) if c is not None else "" for c in row]
        cells = [_NEWLINES.sub("<br>", c) for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def md_code_block(text: Any, lang: str = "text") -> str:
    """A fenced code block that the text cannot close early (the fence outgrows any backtick run)."""
    s = "" if text is None else str(text)
    longest = max((len(m.group(0)) for m in re.finditer(r"`+", s)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{lang}\n{s}\n{fence}\n"


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------


def new_figure(width: float = 7.0, height: float = 4.0):
    """A matplotlib ``Figure`` on the Agg canvas (no pyplot, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Save a figure from :func:`new_figure` as PNG (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path
