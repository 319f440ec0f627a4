"""rlhfkit templatize: a classification CSV (options listed, several phrasings, seeded), a QA file with
and without passages, extraction and summarisation, bad files exiting 2 with file:line:field, and sft
training on the output."""

from __future__ import annotations

import json

import pytest

from core_helpers import read_metrics, write_jsonl
from rlhfkit.synthetic.templatize import TEMPLATES

pytestmark = pytest.mark.usefixtures("one_thread")

REVIEWS = [("The soup was cold and the waiter ignored us.", "negative"),
           ("Lovely garden, friendly staff, we will be back.", "positive"),
           ("It was fine. Nothing special.", "neutral"),
           ("Best pizza in town, hands down!", "positive"),
           ("Forty minutes for a coffee. Never again.", "negative"),
           ("The room was clean, the breakfast average.", "neutral")] * 3


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def reviews_csv(tmp_path):
    path = tmp_path / "reviews.csv"
    rows = ["id,review,sentiment"] + [f'{i},"{text}",{label}' for i, (text, label) in enumerate(REVIEWS)]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_every_task_has_at_least_three_phrasings():
    assert {task: len(t) >= 3 for task, t in TEMPLATES.items()} == dict.fromkeys(TEMPLATES, True)
    assert all("{options" in t.prompt for t in TEMPLATES["classification"])


def test_classification_lists_the_options_and_uses_several_phrasings(run_cli, reviews_csv, tmp_path):
    flags = ["templatize", "--data", reviews_csv, "--task", "classification", "--text-column", "review",
             "--label-column", "sentiment"]
    result = run_cli(*flags, "--output", tmp_path / "a")
    assert result.code == 0, result.err
    records = read(tmp_path / "a" / "sft.jsonl")
    assert len(records) == len(REVIEWS)
    for record, (text, label) in zip(records, REVIEWS):
        assert record["completion"] == label and text in record["prompt"]
        assert record["task"] == "classification"
        prompt = record["prompt"]
        # the sorted label set, as a list or inline
        assert "- negative\n- neutral\n- positive" in prompt or "negative, neutral or positive" in prompt
    used = {r["template"] for r in records}
    assert len(used) >= 3
    stats = json.loads((tmp_path / "a" / "stats.json").read_text())
    assert stats["records"] == 18 and sum(stats["per_template"].values()) == 18
    assert set(stats["per_template"]) == {t.name for t in TEMPLATES["classification"]}
    assert stats["per_label"] == {"negative": 6, "neutral": 6, "positive": 6}
    assert "18 classification records" in result.out

    assert run_cli(*flags, "--output", tmp_path / "b").code == 0
    assert (tmp_path / "b" / "sft.jsonl").read_text() == (tmp_path / "a" / "sft.jsonl").read_text()
    assert run_cli(*flags, "--output", tmp_path / "c", "--seed", "7").code == 0
    assert [r["template"] for r in read(tmp_path / "c" / "sft.jsonl")] != [r["template"] for r in records]


def test_labels_flag_orders_the_options_and_rejects_others(run_cli, reviews_csv, tmp_path):
    flags = ["templatize", "--data", reviews_csv, "--text-column", "review", "--label-column", "sentiment",
             "--output", tmp_path / "o"]
    assert run_cli(*flags, "--labels", "positive,neutral,negative").code == 0
    prompt = read(tmp_path / "o" / "sft.jsonl")[0]["prompt"]
    assert "- positive\n- neutral\n- negative" in prompt or "positive, neutral or negative" in prompt
    result = run_cli(*flags, "--labels", "positive,negative")
    assert result.code == 2
    assert result.errors[0] == (f"error: {reviews_csv}:4: field 'sentiment': label 'neutral' is not one of "
                                "--labels positive, negative")
    assert len(result.errors) == 6


def test_qa_with_and_without_a_passage(run_cli, tmp_path):
    data = write_jsonl(tmp_path / "qa.jsonl", [
        {"q": "What is the capital of Peru?", "a": "Lima", "passage": "Lima is the capital of Peru."},
        {"q": "How many legs has a spider?", "a": 8, "passage": "Spiders have eight legs."}])
    assert run_cli("templatize", "--data", data, "--task", "qa", "--question-column", "q", "--answer-column", "a",
                   "--context-column", "passage", "--output", tmp_path / "ctx").code == 0
    records = read(tmp_path / "ctx" / "sft.jsonl")
    assert [r["completion"] for r in records] == ["Lima", "8"]
    assert all(r["template"].startswith("qa-ctx-") for r in records)
    assert "Lima is the capital of Peru." in records[0]["prompt"] and "capital of Peru?" in records[0]["prompt"]
    assert run_cli("templatize", "--data", data, "--task", "qa", "--question-column", "q", "--answer-column", "a",
                   "--output", tmp_path / "closed").code == 0
    closed = read(tmp_path / "closed" / "sft.jsonl")
    assert all("Lima is" not in r["prompt"] and not r["template"].startswith("qa-ctx") for r in closed)


def test_extraction_and_summarization(run_cli, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [
        {"text": "The meeting moved to 3 May at the Leeds office.", "dates": ["3 May"], "summary": "Moved."}])
    assert run_cli("templatize", "--data", data, "--task", "extraction", "--answer-column", "dates",
                   "--extraction-target", "the date of the meeting", "--output", tmp_path / "e").code == 0
    (record,) = read(tmp_path / "e" / "sft.jsonl")
    assert record["completion"] == "3 May" and "the date of the meeting" in record["prompt"]
    assert run_cli("templatize", "--data", data, "--task", "summarization", "--output", tmp_path / "s").code == 0
    (record,) = read(tmp_path / "s" / "sft.jsonl")
    assert record["completion"] == "Moved." and "Leeds office" in record["prompt"]


def test_bad_files_exit_2_naming_file_line_and_field(run_cli, tmp_path):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine", "label": "a"}, {"text": "no label"},
                                                {"text": "", "label": "b"}, {"text": {"nested": 1}, "label": "a"}])
    result = run_cli("templatize", "--data", data, "--output", tmp_path / "o")
    assert result.code == 2
    assert result.errors == [f"error: {data}:2: field 'label': missing (the label column, --label-column)",
                             f"error: {data}:3: field 'text': empty",
                             f"error: {data}:4: field 'text': expected text, a number or a list of them, got dict"]
    assert not (tmp_path / "o").exists()

    csv = tmp_path / "bad.csv"
    csv.write_text("question,answer\nWhat is 2+2?,4\nA lone question\nx,y,z\n")
    result = run_cli("templatize", "--data", csv, "--task", "qa", "--output", tmp_path / "o")
    assert result.code == 2
    assert result.errors == [f"error: {csv}:4: 3 values for 2 header columns"]
    csv.write_text("question,answer\nWhat is 2+2?,4\nA lone question\n")
    assert run_cli("templatize", "--data", csv, "--task", "qa", "--output", tmp_path / "o").errors == [
        f"error: {csv}:3: field 'answer': missing (the answer column, --answer-column)"]

    result = run_cli("templatize", "--data", data, "--task", "extraction", "--output", tmp_path / "o")
    assert result.errors == ["error: --task extraction needs --extraction-target (what to extract, e.g. 'the date')"]


def test_sft_trains_on_templatize_output(run_cli, reviews_csv, tiny_lm, tmp_path):
    assert run_cli("templatize", "--data", reviews_csv, "--text-column", "review", "--label-column", "sentiment",
                   "--output", tmp_path / "t").code == 0
    result = run_cli("sft", "--model", tiny_lm, "--data", tmp_path / "t" / "sft.jsonl", "--output", tmp_path / "sft",
                     "--max-steps", "2", "--batch-size", "2", "--max-length", "96", "--no-progress")
    assert result.code == 0, result.err
    assert [row["step"] for row in read_metrics(tmp_path / "sft")] == [1, 2]
