"""A constitution: the principles that AI feedback critiques, revises and compares against.

As in Constitutional AI (Bai et al. 2022), each :class:`Principle` carries three texts, sent to
the model verbatim:

* ``critique``: a critique request asked after a response (``rlhfkit cai-revise``),
* ``revision``: the revision request that follows the critique (``rlhfkit cai-revise``),
* ``preference``: the question a judge answers when it compares two responses (``rlhfkit ai-label``).

``--constitution builtin`` is the one shipped with rlhfkit (``data/builtin/constitution.yaml``:
19 principles on harmlessness, honesty, helpfulness and their balance); a file is JSONL (one
record per line) or YAML (a list of records), each record ``{name, critique, revision,
preference}``, every field a non-empty string, names unique. Other fields are ignored.

One principle is sampled per critique/revision round or per comparison. :func:`seeded_principle`
draws it from the seed and the item's own key (prompt, round, pair), not from a shared stream,
so the draw does not depend on the order or the batching of the work, and a resumed run draws
the same principles as an uninterrupted one.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from rlhfkit.errors import InputError, record_problem

FIELDS = ("name", "critique", "revision", "preference")
YAML_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class Principle:
    """One principle of a constitution (each text is sent to the model verbatim)."""

    name: str
    critique: str    # "Identify specific ways in which the assistant's last response is ..."
    revision: str    # "Please rewrite the assistant response to remove ..."
    preference: str  # "Which of these assistant responses is ...? Choose the response that ..."


def builtin_file(name: str) -> Path:
    """A file shipped with rlhfkit under ``rlhfkit/data/builtin/``."""
    return Path(str(resources.files("rlhfkit.data").joinpath("builtin", name)))


def load_constitution(spec: str) -> list[Principle]:
    """The principles of ``builtin`` or of a JSONL / YAML file; InputError lists every problem as
    ``file:line: field 'x': ...``."""
    if spec == "builtin":
        return _load_yaml(builtin_file("constitution.yaml"))
    if not spec:
        raise InputError("--constitution: give a JSONL or YAML file, or `builtin`")
    path = Path(os.path.expanduser(spec))
    if not path.is_file():
        raise InputError(f"--constitution: no such file: {spec} (or use `builtin`)")
    return _load_yaml(path) if path.suffix.lower() in YAML_SUFFIXES else _load_jsonl(path)


def _load_jsonl(path: Path) -> list[Principle]:
    from rlhfkit.data.io import read_records  # the one reader: file:line for every record

    records = read_records(str(path))
    return _validate(str(path), [(r.line, r.data, {}) for r in records])


def _load_yaml(path: Path) -> list[Principle]:
    """A YAML list of records; each problem names the line of its field (or of its record)."""
    import yaml

    try:
        root = yaml.compose(path.read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        raise InputError(record_problem(str(path), line, None, f"invalid YAML ({getattr(e, 'problem', e)})")) \
            from None
    if root is None:
        raise InputError(f"{path}: the file is empty (no principles)")
    if not isinstance(root, yaml.SequenceNode):
        raise InputError(record_problem(str(path), root.start_mark.line + 1, None,
                                        "expected a list of principles ({name, critique, revision, preference})"))
    items = []
    for node in root.value:
        line = node.start_mark.line + 1
        if not isinstance(node, yaml.MappingNode):
            items.append((line, None, {}))
            continue
        data = yaml.SafeLoader("").construct_document(node)
        field_lines = {k.value: k.start_mark.line + 1 for k, _ in node.value if isinstance(k, yaml.ScalarNode)}
        items.append((line, data, field_lines))
    return _validate(str(path), items)


def _validate(source: str, items: list[tuple[int, Any, dict[str, int]]]) -> list[Principle]:
    """``items``: (record line, record, field -> its own line where known)."""
    problems: list[str] = []
    principles: list[Principle] = []
    first_line: dict[str, int] = {}
    for line, data, field_lines in items:
        if not isinstance(data, dict):
            problems.append(record_problem(source, line, None, "expected a record {name, critique, revision, "
                                                               "preference}"))
            continue
        ok = True
        for name in FIELDS:
            value = data.get(name)
            if not isinstance(value, str) or not value.strip():
                got = "missing" if name not in data else f"got {value!r}"
                problems.append(record_problem(source, field_lines.get(name, line), name,
                                               f"expected a non-empty string ({got})"))
                ok = False
        name = data.get("name")
        if isinstance(name, str) and name.strip():
            if name in first_line:
                problems.append(record_problem(source, field_lines.get("name", line), "name",
                                               f"duplicate principle {name!r} (first at line {first_line[name]})"))
                ok = False
            else:
                first_line[name] = field_lines.get("name", line)
        if ok:
            principles.append(Principle(*(data[f].strip() for f in FIELDS)))
    if problems:
        raise InputError(problems)
    if not principles:
        raise InputError(f"{source}: no principles")
    return principles


def sample_principle(principles: Sequence[Principle], rng: random.Random) -> Principle:
    """One principle, uniformly at random from ``rng``."""
    return principles[rng.randrange(len(principles))]


def seeded_principle(principles: Sequence[Principle], seed: int, *key: Any) -> Principle:
    """The principle for one item of work (e.g. ``key = (prompt index, round)`` or a pair's id):
    a pure function of ``seed`` and ``key``, whatever the order in which items are processed."""
    rng = random.Random("rlhfkit-principle:" + ":".join(map(str, (seed, *key))))
    return sample_principle(principles, rng)
