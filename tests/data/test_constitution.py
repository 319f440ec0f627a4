"""The constitution: the built-in principles, JSONL and YAML files, every bad record named by
file:line:field, and the seeded choice of a principle."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from core_helpers import write_text
from rlhfkit.data.constitution import Principle, load_constitution, sample_principle, seeded_principle
from rlhfkit.errors import InputError

RECORD = {"name": "kind", "critique": "Identify specific ways in which the assistant's last response is unkind.",
          "revision": "Please rewrite the assistant response to remove anything unkind.",
          "preference": "Which of these assistant responses is kinder? Choose the response that is kinder."}


def test_builtin_has_at_least_16_unique_principles_over_the_three_themes_and_their_balance():
    principles = load_constitution("builtin")
    names = [p.name for p in principles]
    assert len(principles) >= 16
    assert len(set(names)) == len(names)
    themes = Counter(name.split("-", 1)[0] for name in names)
    assert set(themes) == {"harmless", "honest", "helpful", "balance"}
    assert min(themes.values()) >= 3, themes
    # the balance: not refusing benign requests, not preaching
    assert {"balance-no-needless-refusal", "balance-not-preachy"} <= set(names)
    for p in principles:  # the three requests in Constitutional AI's form
        assert p.critique.startswith("Identify specific ways in which the assistant's last response"), p.name
        assert p.revision.startswith("Please rewrite the assistant response to remove"), p.name
        assert p.preference.startswith("Which of these assistant responses"), p.name
        assert "Choose the response" in p.preference, p.name
    assert len({p.critique for p in principles}) == len(principles)
    assert len({p.preference for p in principles}) == len(principles)


def test_a_jsonl_file_loads_in_order(tmp_path):
    other = {**RECORD, "name": "brief", "critique": "Is it too long?", "extra": "ignored"}
    path = write_text(tmp_path / "c.jsonl", json.dumps(RECORD) + "\n\n" + json.dumps(other) + "\n")
    assert load_constitution(path) == [Principle(**RECORD),
                                       Principle("brief", "Is it too long?", RECORD["revision"],
                                                 RECORD["preference"])]


def test_a_yaml_file_loads_with_folded_text(tmp_path):
    path = write_text(tmp_path / "c.yml", (
        "# a comment\n"
        "- name: kind\n"
        "  critique: >-\n"
        "    Identify specific ways in which the assistant's\n"
        "    last response is unkind.\n"
        f"  revision: {json.dumps(RECORD['revision'])}\n"
        f"  preference: {json.dumps(RECORD['preference'])}\n"))
    assert load_constitution(path) == [Principle(**RECORD)]


YAML_BAD = (
    "- name: a\n"            # 1
    "  critique: c\n"         # 2
    "  revision: ''\n"        # 3: empty
    "  preference: p\n"       # 4
    "- name: a\n"             # 5: duplicate name, preference missing
    "  critique: c\n"         # 6
    "  revision: 7\n"         # 7: not a string
    "- just text\n")          # 8: not a record


def test_bad_yaml_records_name_the_line_of_each_field(tmp_path):
    path = write_text(tmp_path / "bad.yaml", YAML_BAD)
    with pytest.raises(InputError) as e:
        load_constitution(path)
    assert e.value.problems == [
        f"{path}:3: field 'revision': expected a non-empty string (got '')",
        f"{path}:7: field 'revision': expected a non-empty string (got 7)",
        f"{path}:5: field 'preference': expected a non-empty string (missing)",
        f"{path}:5: field 'name': duplicate principle 'a' (first at line 1)",
        f"{path}:8: expected a record {{name, critique, revision, preference}}",
    ]


def test_bad_jsonl_records_name_file_line_and_field(tmp_path):
    rows = [RECORD, {**RECORD, "name": "b", "critique": "   "},
            {k: v for k, v in {**RECORD, "name": "c"}.items() if k != "preference"}, RECORD]
    path = write_text(tmp_path / "bad.jsonl", "".join(json.dumps(r) + "\n" for r in rows) + "[1]\n")
    with pytest.raises(InputError) as e:
        load_constitution(path)
    # a line that is not an object stops at the reader, before the fields are checked
    assert e.value.problems == [f"{path}:5: expected a JSON object, got list"]
    path = write_text(tmp_path / "bad2.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(InputError) as e:
        load_constitution(path)
    assert e.value.problems == [
        f"{path}:2: field 'critique': expected a non-empty string (got '   ')",
        f"{path}:3: field 'preference': expected a non-empty string (missing)",
        f"{path}:4: field 'name': duplicate principle 'kind' (first at line 1)",
    ]


@pytest.mark.parametrize("text, problem", [
    ("", "the file is empty (no principles)"),
    ("name: a\ncritique: b\n", ":1: expected a list of principles"),
    ("- name: [unclosed\n", ": invalid YAML"),
])
def test_a_yaml_file_that_is_not_a_list_of_records(tmp_path, text, problem):
    path = write_text(tmp_path / "c.yaml", text)
    with pytest.raises(InputError) as e:
        load_constitution(path)
    assert len(e.value.problems) == 1 and problem in e.value.problems[0]
    assert e.value.problems[0].startswith(path)


def test_a_missing_file_says_so():
    with pytest.raises(InputError, match="no such file: nowhere.yaml"):
        load_constitution("nowhere.yaml")


def test_principles_are_sampled_from_the_seed_and_the_item_key_not_the_order():
    principles = load_constitution("builtin")
    draws = [seeded_principle(principles, 7, prompt, rnd).name for prompt in range(40) for rnd in range(2)]
    again = {(p, r): seeded_principle(principles, 7, p, r).name for p in reversed(range(40)) for r in range(2)}
    assert draws == [again[p, r] for p in range(40) for r in range(2)]
    assert len(set(draws)) >= 10  # spread over the constitution
    assert draws != [seeded_principle(principles, 8, p, r).name for p in range(40) for r in range(2)]
    rng_a, rng_b = random.Random(3), random.Random(3)
    assert [sample_principle(principles, rng_a) for _ in range(5)] == \
        [sample_principle(principles, rng_b) for _ in range(5)]
