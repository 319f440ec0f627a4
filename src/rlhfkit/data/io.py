"""Reading records from where users keep data, keeping where each record came from; writing JSONL
atomically (:func:`write_jsonl`, the project's one JSONL writer).

A data value (``--data``, ``--eval-data``, ``--prompts``) names one source or a mixture of several
(the grammar and the mixing rule are in docs/data.md):

- a local ``.jsonl`` / ``.json`` / ``.parquet`` file or a saved ``datasets`` folder;
- a Hugging Face dataset id, ``name`` or ``org/name``, optionally ``:split`` (default ``train``),
  loaded with ``datasets.load_dataset`` (offline, ``HF_DATASETS_OFFLINE=1``, from the datasets cache);
- ``source:ratio,source:ratio,...``: a seeded mixture (:func:`mix`).

Every record keeps its origin (file and line; for a dataset id, ``id:split`` and the row number),
so every problem names it the same way, whatever the source.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any, TextIO

from rlhfkit.errors import InputError, record_problem

DEFAULT_SPLIT = "train"
# A Hub dataset id: `name` or `org/name` (letters, digits, `_`, `.`, `-`).
DATASET_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
# A missing name ending like this is a file the user meant, not a dataset id.
FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".tsv", ".txt", ".arrow", ".gz", ".zst", ".zip")
RATIO = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


@dataclass(frozen=True)
class Record:
    """One raw record and where it came from (file and 1-based line or record number)."""

    data: dict[str, Any]
    file: str
    line: int

    def problem(self, field: str | None, message: str) -> str:
        return record_problem(self.file, self.line, field, message)


@dataclass(frozen=True)
class DataSource:
    """One source of a data value: a local file or folder, or a Hugging Face dataset id."""

    location: str              # the path, or the dataset id
    dataset_id: bool           # True: loaded with datasets.load_dataset
    split: str | None = None   # of a dataset id (default train) or a saved DatasetDict folder
    ratio: float | None = None  # its share of a mixture, when given

    @property
    def label(self) -> str:
        """The source as problems name it (the "file" of ``file:line``)."""
        return f"{self.location}:{self.split}" if self.split else self.location


def parse_data_spec(spec: str) -> list[DataSource]:
    """The sources a data value names; InputError lists every problem of its grammar.

    ``spec := source ("," source)*`` and ``source := location [":" split] [":" ratio]``. A text that
    exists as a path is a local source whole (commas and colons included). Otherwise a ratio is
    a number after the last colon, and a split is everything after the first colon that remains
    (dataset ids have no colon; ``train[:10%]`` is one split). A location that does not exist is a
    dataset id if it is one by its form (``name`` or ``org/name``) and has no data-file suffix; else
    it is a missing local path. Ratios: all sources or none, each > 0, and only in a mixture.
    """
    if os.path.exists(spec):
        return [DataSource(spec, dataset_id=False)]
    sources, problems = [], []
    for text in spec.split(","):
        try:
            if not text.strip():
                raise InputError(f"{spec}: an empty source (two commas in a row, or a comma at an end)")
            sources.append(_parse_source(text.strip()))
        except InputError as e:
            problems += e.problems
    if not problems:
        given = [s.ratio is not None for s in sources]
        if len(sources) == 1 and given[0]:
            problems.append(f"{spec}: a ratio is a share of a mixture of two or more sources "
                            "(e.g. a.jsonl:0.7,org/name:0.3)")
        elif any(given) and not all(given):
            problems.append(f"{spec}: give every source of a mixture a ratio, or none")
    if problems:
        raise InputError(problems)
    return sources


def _parse_source(text: str) -> DataSource:
    if os.path.exists(text):
        return DataSource(text, dataset_id=False)
    if "://" in text:
        raise InputError(f"{text}: URLs are not read: download the file, or give the Hugging Face dataset id")
    ratio = None
    head, colon, tail = text.rpartition(":")
    if colon and RATIO.fullmatch(tail):
        ratio = float(tail)
        if not (ratio > 0 and math.isfinite(ratio)):
            raise InputError(f"{text}: the ratio must be a finite number > 0 (got {tail})")
        text = head
        if os.path.exists(text):
            return DataSource(text, dataset_id=False, ratio=ratio)
    location, colon, split = text.partition(":")
    if colon and not (location and split):
        raise InputError(f"{text}: expected name:split (one of them is empty)")
    if colon and os.path.isdir(location):  # a saved DatasetDict folder and one of its splits
        return DataSource(location, dataset_id=False, split=split, ratio=ratio)
    if colon and os.path.exists(location):
        raise InputError(f"{text}: a split (:{split}) belongs to a dataset id or a saved `datasets` folder, "
                         f"and {location} is a file")
    if DATASET_ID.fullmatch(location) and not location.lower().endswith(FILE_SUFFIXES):
        return DataSource(location, dataset_id=True, split=split or DEFAULT_SPLIT, ratio=ratio)
    return DataSource(location, dataset_id=False, split=split or None, ratio=ratio)


def data_spec_problems(spec: str) -> list[str]:
    """What is wrong with a data value before anything is loaded: its grammar, and local parts
    that do not exist (a dataset id is only checked when it is loaded)."""
    try:
        sources = parse_data_spec(spec)
    except InputError as e:
        return e.problems
    return [f"no such file or directory: {s.location}" for s in sources
            if not s.dataset_id and not os.path.exists(s.location)]


def read_records(spec: str, *, config: str = "", seed: int = 0) -> list[Record]:
    """All records of a data value (one source, or a mixture drawn with ``seed``); ``config`` is
    the configuration of its dataset ids. Every problem of every source is reported at once."""
    if not spec:
        raise InputError("no data file given")
    sources = parse_data_spec(spec)
    tables, problems = [], []
    for source in sources:
        try:
            tables.append(_read_source(source, config))
        except InputError as e:
            problems += e.problems
    if problems:
        raise InputError(problems)
    if len(sources) == 1:
        return tables[0]
    return mix(tables, [s.ratio for s in sources], seed)


def _read_source(source: DataSource, config: str) -> list[Record]:
    path = source.location
    if source.dataset_id:
        records = _read_dataset_id(path, source.split, config)
    elif not os.path.exists(path):
        raise InputError(f"{path}: no such file or directory")
    elif os.path.isdir(path):
        records = _read_datasets_dir(path, source.split)
    elif path.endswith(".parquet"):
        records = _read_parquet(path)
    elif path.endswith(".json"):
        records = _read_json(path)
    elif path.endswith((".csv", ".tsv")):
        records = _read_csv(path)
    else:
        records = _read_jsonl(path)
    if not records:
        raise InputError(f"{source.label}: " + ("the split is empty (no records)" if source.split
                                                 else "the file is empty (no records)"))
    return records


def mixture_counts(sizes: list[int], ratios: list[float]) -> list[int]:
    """Records each source gives a mixture of ``sum(sizes)`` records: source i's share is
    ``ratio_i / sum(ratios)``; the fractions go to the largest remainders (ties: the earlier source)
    so the counts add up exactly."""
    total, weight = sum(sizes), sum(ratios)
    exact = [total * r / weight for r in ratios]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[:total - sum(counts)]:
        counts[i] += 1
    return counts


def mix(tables: list[list[Record]], ratios: list[float | None], seed: int) -> list[Record]:
    """A mixture of the sources' records, shuffled; which records and their order are a pure
    function of ``seed`` and the sources.

    With ratios, source i gives ``mixture_counts`` records: fewer than it has, a seeded sample
    without repetition; more, every record ``count // size`` times plus a sample of the rest.
    Without ratios every record is taken once.
    """
    sizes = [len(t) for t in tables]
    counts = sizes if ratios[0] is None else mixture_counts(sizes, ratios)
    mixed = []
    for index, (table, count) in enumerate(zip(tables, counts)):
        rng = random.Random(f"rlhfkit-mixture:{seed}:{index}")
        whole, rest = divmod(count, len(table))
        mixed += [table[i] for i in sorted(list(range(len(table))) * whole + rng.sample(range(len(table)), rest))]
    random.Random(f"rlhfkit-mixture:{seed}").shuffle(mixed)
    return mixed


def _read_dataset_id(name: str, split: str, config: str) -> list[Record]:
    import datasets

    label = f"{name}:{split}"
    try:
        dataset = datasets.load_dataset(name, config or None, split=split)
    except Exception as e:  # the Hub, the cache and the builders raise many types: each becomes one line
        reason = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
        offline = " (offline: only datasets already in the datasets cache load)" \
            if datasets.config.HF_HUB_OFFLINE else ""
        raise InputError(f"{label}: no such local file or folder, and the Hugging Face dataset "
                         f"{name!r}{f' (config {config!r})' if config else ''} did not load{offline}: "
                         f"{type(e).__name__}: {reason}") from None
    return [Record(row, label, i) for i, row in enumerate(dataset.to_list(), start=1)]


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


def _read_csv(path: str) -> list[Record]:
    """A CSV file (TSV for ``.tsv``) with a header row: one record per row, every value a string,
    numbered by the line the row starts on. A row with fewer values than the header lacks the last
    columns (a missing field where a command reads them); one with more is a problem."""
    import csv

    records, problems = [], []
    with open(path, encoding="utf-8-sig", errors="replace", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t" if path.endswith(".tsv") else ",")
        header = reader.fieldnames or []  # reads the header row
        start = reader.line_num + 1
        for row in reader:
            if None in row:
                problems.append(record_problem(path, start, None, f"{len(header) + len(row[None])} values for "
                                               f"{len(header)} header columns"))
            else:
                records.append(Record({k: v for k, v in row.items() if v is not None}, path, start))
            start = reader.line_num + 1
    if problems:
        raise InputError(problems)
    return records


def _read_parquet(path: str) -> list[Record]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise InputError(f"{path}: cannot read Parquet ({e})") from None
    return [Record(r, path, i) for i, r in enumerate(rows, start=1)]


def _read_datasets_dir(path: str, split: str | None) -> list[Record]:
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(path)
    except Exception as e:
        raise InputError(f"{path}: not a saved `datasets` folder ({e})") from None
    if isinstance(ds, DatasetDict):
        if split is not None and split not in ds:
            raise InputError(f"{path}:{split}: no such split (the folder has {', '.join(ds)})")
        ds = ds[split or (DEFAULT_SPLIT if DEFAULT_SPLIT in ds else next(iter(ds)))]
    elif split is not None:
        raise InputError(f"{path}:{split}: the folder holds one dataset, not splits")
    label = f"{path}:{split}" if split else path
    return [Record(dict(r), label, i) for i, r in enumerate(ds, start=1)]


def to_jsonable(obj: Any) -> Any:
    """``obj`` as strict-JSON values: NaN/inf -> None, numpy scalars/arrays -> Python, Path -> str,
    dataclasses -> dicts."""
    if obj is None or isinstance(obj, (bool, str, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    # numpy scalars and arrays without importing numpy here
    if hasattr(obj, "tolist"):
        return to_jsonable(obj.tolist())
    if hasattr(obj, "item"):
        return to_jsonable(obj.item())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    return str(obj)


@contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[TextIO]:
    """A text file that appears at ``path`` only once it is complete.

    It is written under a temporary name in the same folder (so the rename stays on one file
    system) and moved over ``path`` with ``os.replace``: a reader sees the old file or the new
    one, never half of one; on an error the temporary file is removed and ``path`` is untouched.
    """
    path = os.path.abspath(os.fspath(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # A name of its own (two writers of one path do not share it), created with the usual mode.
    tmp = f"{path}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_jsonl(path: str | os.PathLike, rows: Iterable[Any]) -> str:
    """Write one strict-JSON object per line (:func:`to_jsonable`), atomically (:func:`atomic_open`);
    ``rows`` may be a generator, written as it goes. Returns the path as a string."""
    with atomic_open(path) as f:
        for row in rows:
            f.write(json.dumps(to_jsonable(row), ensure_ascii=False, allow_nan=False) + "\n")
    return os.fspath(path)
