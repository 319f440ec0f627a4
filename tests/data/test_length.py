"""The one length policy (rlhfkit.data.length): counts, the report line, drop vs truncate, problems."""

from __future__ import annotations

import pytest

from rlhfkit.data.io import Record
from rlhfkit.data.length import ExampleError, apply_length_policy, length_report
from rlhfkit.errors import InputError


def encode(word: str):
    """A toy encoder with limit 4: a word's encoding is itself cut to 4 letters; 'bad' is unusable."""
    if word == "bad":
        raise ExampleError("not a word", "text")
    return word[:4], len(word) > 4


def test_report_wording():
    assert (length_report("f.jsonl", 2, 1, "--max-length 512", "truncate")
            == "f.jsonl: 2 example(s) truncated and 1 dropped at --max-length 512 (policy: truncate)")


@pytest.mark.parametrize("truncation, kept, counts", [
    ("truncate", ["abc", "abcd", "long"], "1 example(s) truncated and 0 dropped"),
    ("drop", ["abc", "abcd"], "0 example(s) truncated and 1 dropped"),
])
def test_truncate_keeps_the_cut_example_and_drop_skips_it(truncation, kept, counts):
    said = []
    got = apply_length_policy(["abc", "abcd", "longer"], encode, source="f", max_length=4, truncation=truncation,
                              say=said.append)
    assert got == kept and said == [f"f: {counts} at --max-length 4 (policy: {truncation})"]


def test_nothing_over_the_limit_says_nothing():
    said = []
    assert apply_length_policy(["ab"], encode, source="f", max_length=4, truncation="drop", say=said.append) == ["ab"]
    assert said == []


def test_every_example_dropped_is_an_input_error_with_the_limit_named():
    with pytest.raises(InputError) as e:
        apply_length_policy(["longer", "longest"], encode, source="f", max_length=4, truncation="drop",
                            limit="4 prompt tokens")
    assert e.value.problems == ["f: every example is longer than 4 prompt tokens and was dropped"]


def test_problems_name_file_record_and_field():
    class Ex(str):
        source = Record({}, "data.jsonl", 7)

    with pytest.raises(InputError) as e:
        apply_length_policy(["ok", Ex("bad"), "bad"], encode, source="data.jsonl", max_length=4, truncation="truncate")
    assert e.value.problems == ["data.jsonl:7: field 'text': not a word", "not a word"]
