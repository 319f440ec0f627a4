"""Data formats and schemas: JSONL / JSON / Parquet / saved `datasets` folders read the same records;
rankings expand into pairs; the implicit prompt of message-list pairs; line numbers kept."""

from __future__ import annotations

import json
from itertools import combinations

import pytest

from core_helpers import write_jsonl
from rlhfkit.data.io import read_records
from rlhfkit.data.schema import load_preferences, load_prompts, load_rankings, load_sft
from rlhfkit.errors import InputError

pytestmark = pytest.mark.usefixtures("one_thread")

PREFERENCES = [
    {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5", "margin": 2.0},
    {"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Lyon", "margin": None},
    {"prompt": "Say hi", "chosen": "Hello!", "rejected": "No.", "margin": 0.5},
]
CONVERSATIONS = [
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    {"messages": [{"role": "system", "content": "be terse"}, {"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
                  {"role": "assistant", "content": "6"}]},
]


def _write_all_formats(tmp_path, rows) -> dict[str, str]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset, DatasetDict

    paths = {"jsonl": write_jsonl(tmp_path / "d.jsonl", rows)}
    (tmp_path / "d.json").write_text(json.dumps(rows))
    paths["json"] = str(tmp_path / "d.json")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    paths["parquet"] = str(tmp_path / "d.parquet")
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    paths["datasets"] = str(tmp_path / "ds")
    DatasetDict({"train": Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dsd"))
    paths["datasets-dict"] = str(tmp_path / "dsd")
    return paths


def _preference_view(examples):
    return [(e.prompt, e.chosen, e.rejected, e.margin, e.source.line) for e in examples]


def test_preferences_read_the_same_from_every_format(tmp_path):
    paths = _write_all_formats(tmp_path, PREFERENCES)
    expected = [(r["prompt"], r["chosen"], r["rejected"], r["margin"], i + 1) for i, r in enumerate(PREFERENCES)]
    for fmt, path in paths.items():
        assert _preference_view(load_preferences(path)) == expected, fmt
        assert {e.source.file for e in load_preferences(path)} == {path}


def test_conversations_read_the_same_from_every_format(tmp_path):
    paths = _write_all_formats(tmp_path, CONVERSATIONS)
    reference = [(e.prompt, e.completion) for e in load_sft(paths["jsonl"])]
    assert reference[1][0] == CONVERSATIONS[1]["messages"][:2]  # system + user before the first reply
    assert reference[1][1] == CONVERSATIONS[1]["messages"][2:]  # every later turn is the completion
    for fmt, path in paths.items():
        assert [(e.prompt, e.completion) for e in load_sft(path)] == reference, fmt


def test_a_parquet_record_with_a_bad_field_names_its_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": "a", "chosen": "x", "rejected": "y"}, {"prompt": "b", "chosen": "z", "rejected": "z"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    with pytest.raises(InputError) as e:
        load_preferences(str(tmp_path / "p.parquet"))
    assert e.value.problems == [f"{tmp_path / 'p.parquet'}:2: field 'chosen': identical to 'rejected': "
                                "the pair carries no preference"]


def test_unreadable_parquet_and_datasets_folder_are_input_errors(tmp_path):
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match="cannot read Parquet"):
        read_records(str(tmp_path / "broken.parquet"))
    (tmp_path / "folder").mkdir()
    with pytest.raises(InputError, match="not a saved `datasets` folder"):
        read_records(str(tmp_path / "folder"))


def test_blank_lines_keep_line_numbers(tmp_path):
    path = tmp_path / "gaps.jsonl"
    path.write_text('\n{"prompt": "a", "completion": "b"}\n\n\n{"prompt": "c", "completion": "d"}\n')
    assert [e.source.line for e in load_sft(str(path))] == [2, 5]


@pytest.mark.parametrize("k", [2, 3, 4])
def test_rankings_expand_into_all_pairs_best_first(tmp_path, k):
    completions = [f"c{i}" for i in range(k)]
    ranking = list(reversed(range(k)))  # c{k-1} is best
    path = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "p", "completions": completions, "ranking": ranking}])
    pairs = load_preferences(path)
    assert len(pairs) == k * (k - 1) // 2
    expected = [(completions[a], completions[b]) for a, b in combinations(ranking, 2)]
    assert [(p.chosen, p.rejected) for p in pairs] == expected
    # every pair puts the better-ranked completion first
    position = {c: ranking.index(i) for i, c in enumerate(completions)}
    assert all(position[p.chosen] < position[p.rejected] for p in pairs)
    (r,) = load_rankings(path)
    assert r.ranking == ranking and r.completions == completions


def test_pairs_and_rankings_mix_in_one_file(tmp_path):
    path = write_jsonl(tmp_path / "mix.jsonl", [
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        {"prompt": "q", "completions": ["x", "y", "z"], "ranking": [1, 2, 0]},
    ])
    pairs = load_preferences(path)
    assert [(p.prompt, p.chosen, p.rejected, p.source.line) for p in pairs] == [
        ("p", "a", "b", 1), ("q", "y", "z", 2), ("q", "y", "x", 2), ("q", "z", "x", 2)]


def test_implicit_prompt_is_the_shared_leading_turns(tmp_path):
    user = {"role": "user", "content": "Recommend a book."}
    system = {"role": "system", "content": "You are helpful."}
    good = {"role": "assistant", "content": "Try 'Dune'."}
    bad = {"role": "assistant", "content": "No."}
    path = write_jsonl(tmp_path / "implicit.jsonl", [
        {"chosen": [system, user, good], "rejected": [system, user, bad]},
        {"chosen": [user, good], "rejected": [user, bad], "margin": 1},
    ])
    first, second = load_preferences(path)
    assert first.prompt == [system, user] and first.chosen == [good] and first.rejected == [bad]
    assert second.prompt == [user] and second.chosen == [good] and second.margin == 1.0
    assert isinstance(second.margin, float)


def test_implicit_prompt_needs_shared_turns(tmp_path):
    path = write_jsonl(tmp_path / "noshare.jsonl", [
        {"chosen": [{"role": "user", "content": "a"}], "rejected": [{"role": "user", "content": "b"}]}])
    with pytest.raises(InputError) as e:
        load_preferences(path)
    assert e.value.problems == [f"{path}:1: field 'prompt': missing, and chosen/rejected share no leading turns"]


def test_prompt_records(tmp_path):
    path = write_jsonl(tmp_path / "prompts.jsonl", [
        {"prompt": "Tell a joke.", "id": 7},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    ])
    first, second = load_prompts(path)
    assert first.prompt == "Tell a joke." and first.extra == {"id": 7}
    assert second.prompt == [{"role": "user", "content": "hi"}]  # the reply is not part of the prompt
