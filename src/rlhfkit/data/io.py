"""Reading records from JSONL, JSON, Parquet or a saved `datasets` folder, keeping line numbers."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from rlhfkit.errors import InputError, record_problem


@dataclass(frozen=True)
class Record:
    """One raw record and where it came from (file and 1-based line or record number)."""

    data: dict[str, Any]
    file: str
    line: int

    def problem(self, field: str | None, message: str) -> str:
        return record_problem(self.file, self.line, field, message)


def read_records(path: str) -> list[Record]:
    """All records of ``path``; every unreadable record is reported at once (InputError)."""
    if not path:
        raise InputError("no data file given")
    if not os.path.exists(path):
        raise InputError(f"{path}: no such file or directory")
    if os.path.isdir(path):
        records = _read_datasets_dir(path)
    elif path.endswith(".parquet"):
        records = _read_parquet(path)
    elif path.endswith(".json"):
        records = _read_json(path)
    else:
        records = _read_jsonl(path)
    if not records:
        raise InputError(f"{path}: the file is empty (no records)")
    return records


def _read_jsonl(path: str) -> list[Record]:
    records, problems = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(record_problem(path, number, None, f"invalid JSON ({e.msg} at column {e.colno})"))
                continue
            if not isinstance(value, dict):
                problems.append(record_problem(path, number, None,
                                               f"expected a JSON object, got {type(value).__name__}"))
                continue
            records.append(Record(value, path, number))
    if problems:
        raise InputError(problems)
    return records


def _read_json(path: str) -> list[Record]:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except json.JSONDecodeError as e:
        raise InputError(record_problem(path, e.lineno, None, f"invalid JSON ({e.msg})")) from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise InputError(f"{path}: expected a JSON list of objects")
    problems = [record_problem(path, i, None, "expected a JSON object")
                for i, v in enumerate(value, start=1) if not isinstance(v, dict)]
    if problems:
        raise InputError(problems)
    return [Record(v, path, i) for i, v in enumerate(value, start=1)]


def _read_parquet(path: str) -> list[Record]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise InputError(f"{path}: cannot read Parquet ({e})") from None
    return [Record(r, path, i) for i, r in enumerate(rows, start=1)]


def _read_datasets_dir(path: str) -> list[Record]:
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(path)
    except Exception as e:
        raise InputError(f"{path}: not a saved `datasets` folder ({e})") from None
    if isinstance(ds, DatasetDict):
        ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
    return [Record(dict(r), path, i) for i, r in enumerate(ds, start=1)]


def write_jsonl(path: str, rows) -> None:
    """Write rows atomically (temporary name, then rename)."""
    tmp = f"{path}.tmp"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
