"""rlhfkit.data.io.write_jsonl: the project's one JSONL writer (atomic, strict JSON)."""

from __future__ import annotations

import json
import math

import pytest

from rlhfkit.data.io import read_records, write_jsonl


def test_rows_round_trip_as_strict_json(tmp_path):
    path = tmp_path / "sub" / "rows.jsonl"
    rows = [{"prompt": "héllo", "score": 0.5, "tags": ("a", "b")}, {"prompt": "x", "score": math.nan}]
    assert write_jsonl(path, (r for r in rows)) == str(path)  # a generator is fine; the folder is made
    assert path.read_text(encoding="utf-8").splitlines() == [
        '{"prompt": "héllo", "score": 0.5, "tags": ["a", "b"]}',
        '{"prompt": "x", "score": null}',  # NaN is not JSON: written as null
    ]
    assert [r.data["prompt"] for r in read_records(str(path))] == ["héllo", "x"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(tmp_path):
    path = tmp_path / "rows.jsonl"
    write_jsonl(path, [{"n": 1}])

    def rows():
        yield {"n": 2}
        raise RuntimeError("the source failed half-way")

    with pytest.raises(RuntimeError, match="half-way"):
        write_jsonl(path, rows())
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"n": 1}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl"]
