"""Bad input through the real CLI: exit code 2 and one line per problem naming the file, the line
(record) number and the field; no traceback; no model loaded."""

from __future__ import annotations

import json

import pytest

from core_helpers import read_metrics, write_text

pytestmark = pytest.mark.usefixtures("one_thread")

GOOD_SFT = json.dumps({"prompt": "Say hi.", "completion": "Hi!"})
GOOD_PAIR = json.dumps({"prompt": "Say hi.", "chosen": "Hi!", "rejected": "Go away."})


def _lines(*rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


SFT_CASES = {
    "invalid-json": (_lines(GOOD_SFT, GOOD_SFT, '{"prompt": "a", "completion": '), 3, None, "invalid JSON"),
    "not-an-object": (_lines(GOOD_SFT, "[1, 2]"), 2, None, "expected a JSON object, got list"),
    "missing-field": (_lines(GOOD_SFT, {"prompt": "x"}), 2, "completion", "missing field"),
    "no-schema": (_lines({"text": "x"}), 1, None, "expected 'messages' or 'prompt' and 'completion'"),
    "wrong-type": (_lines(GOOD_SFT, GOOD_SFT, GOOD_SFT, {"prompt": 5, "completion": "y"}), 4, "prompt",
                   "expected a string or a list of messages, got int"),
    "unknown-role": (_lines(GOOD_SFT, {"messages": [{"role": "robot", "content": "beep"},
                                                     {"role": "assistant", "content": "boop"}]}),
                     2, "messages[0].role", "unknown role 'robot'"),
    "content-not-text": (_lines({"messages": [{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": 3}]}),
                         1, "messages[1].content", "expected a string"),
    "no-assistant-turn": (_lines(GOOD_SFT, {"messages": [{"role": "user", "content": "hi"}]}), 2, "messages",
                          "no assistant message"),
    "completion-not-assistant": (_lines({"prompt": [{"role": "user", "content": "a"}],
                                         "completion": [{"role": "user", "content": "b"}]}),
                                 1, "completion[0].role", "expected 'assistant', got 'user'"),
    "empty-completion": (_lines({"prompt": "a", "completion": "  "}), 1, "completion", "is empty"),
}

RM_CASES = {
    "chosen-identical-to-rejected": (_lines(GOOD_PAIR, {"prompt": "p", "chosen": "same", "rejected": "same"}),
                                     2, "chosen", "identical to 'rejected'"),
    "missing-rejected": (_lines(GOOD_PAIR, GOOD_PAIR, {"prompt": "p", "chosen": "a"}), 3, "rejected",
                         "missing field"),
    "wrong-type": (_lines({"prompt": "p", "chosen": {"text": "a"}, "rejected": "b"}), 1, "chosen",
                   "expected a string or a list of messages, got dict"),
    "margin-not-a-number": (_lines(GOOD_PAIR, {"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}),
                            2, "margin", "expected a number, got 'big'"),
    "string-pair-without-prompt": (_lines({"chosen": "a", "rejected": "b"}), 1, "prompt", "missing field"),
    "ranking-not-a-permutation": (_lines(GOOD_PAIR, {"prompt": "p", "completions": ["a", "b", "c"],
                                                      "ranking": [0, 0, 1]}),
                                  2, "ranking", "expected a permutation of 0..2"),
    "unknown-role": (_lines({"prompt": [{"role": "human", "content": "hi"}], "chosen": "a", "rejected": "b"}),
                     1, "prompt[0].role", "unknown role 'human'"),
}


def _check_one_problem(result, path, line, field, fragment):
    assert result.code == 2, result.err
    assert "Traceback" not in result.err
    assert len(result.errors) == 1, result.err
    where = f"error: {path}:{line}:" + (f" field '{field}':" if field else "")
    assert result.errors[0].startswith(where), result.errors[0]
    assert fragment in result.errors[0]


@pytest.mark.parametrize("case", list(SFT_CASES))
def test_sft_bad_record(case, run_cli, no_model_loading, tiny_lm, tmp_path):
    text, line, field, fragment = SFT_CASES[case]
    path = write_text(tmp_path / "train.jsonl", text)
    result = run_cli("sft", "--model", tiny_lm, "--data", path, "--output", tmp_path / "out", "--no-progress")
    _check_one_problem(result, path, line, field, fragment)
    assert no_model_loading == []


@pytest.mark.parametrize("case", list(RM_CASES))
def test_rm_bad_record(case, run_cli, no_model_loading, tiny_lm, tmp_path):
    text, line, field, fragment = RM_CASES[case]
    path = write_text(tmp_path / "pairs.jsonl", text)
    result = run_cli("rm", "--model", tiny_lm, "--data", path, "--output", tmp_path / "out", "--no-progress")
    _check_one_problem(result, path, line, field, fragment)
    assert no_model_loading == []


@pytest.mark.parametrize("text", ["", "\n\n  \n"])
def test_empty_file(text, run_cli, no_model_loading, tiny_lm, tmp_path):
    path = write_text(tmp_path / "empty.jsonl", text)
    for command in ("sft", "rm"):
        result = run_cli(command, "--model", tiny_lm, "--data", path, "--output", tmp_path / "out")
        assert result.code == 2
        assert result.errors == [f"error: {path}: the file is empty (no records)"]


def test_every_bad_record_is_reported_one_line_each(run_cli, no_model_loading, tiny_lm, tmp_path):
    path = write_text(tmp_path / "train.jsonl", _lines(GOOD_SFT, "{oops", GOOD_SFT, "{also broken"))
    result = run_cli("sft", "--model", tiny_lm, "--data", path, "--output", tmp_path / "out")
    assert result.code == 2
    assert [e.split(" invalid JSON")[0] for e in result.errors] == [f"error: {path}:2:", f"error: {path}:4:"]

    path = write_text(tmp_path / "pairs.jsonl", _lines(
        GOOD_PAIR, {"prompt": "p", "chosen": 1, "rejected": None}, GOOD_PAIR))
    result = run_cli("rm", "--model", tiny_lm, "--data", path, "--output", tmp_path / "out")
    assert result.code == 2
    assert result.errors == [
        f"error: {path}:2: field 'chosen': expected a string or a list of messages, got int",
        f"error: {path}:2: field 'rejected': missing field",
    ]


def test_bad_eval_data_is_reported_too(run_cli, no_model_loading, tiny_lm, sft_toy, tmp_path):
    path = write_text(tmp_path / "eval.jsonl", _lines(GOOD_SFT, {"prompt": "x", "completion": ["no"]}))
    result = run_cli("sft", "--model", tiny_lm, "--data", sft_toy, "--eval-data", path, "--output", tmp_path / "o")
    assert result.code == 2
    assert result.errors[0].startswith(f"error: {path}:2: field 'completion[0]':")


# ------------------------------------------------------------------ examples longer than --max-length

LONG = {"prompt": "Tell me a long story about " + "dragons " * 5, "completion": "Once upon a time " * 8}


@pytest.fixture
def with_long_example(tmp_path) -> str:
    return write_text(tmp_path / "mixed.jsonl", _lines(GOOD_SFT, LONG, {"prompt": "Say no.", "completion": "No."}))


def test_truncate_policy_reports_the_count(run_cli, tiny_lm, with_long_example, tmp_path):
    result = run_cli("sft", "--model", tiny_lm, "--data", with_long_example, "--output", tmp_path / "o",
                     "--max-length", "64", "--max-steps", "1", "--batch-size", "3", "--no-progress")
    assert result.code == 0, result.err
    assert "1 example(s) truncated and 0 dropped at --max-length 64 (policy: truncate)" in result.out
    assert read_metrics(tmp_path / "o")[0]["epoch"] == pytest.approx(1.0)  # all three examples kept


def test_drop_policy_skips_and_reports(run_cli, tiny_lm, with_long_example, tmp_path):
    result = run_cli("sft", "--model", tiny_lm, "--data", with_long_example, "--output", tmp_path / "o",
                     "--max-length", "64", "--truncation", "drop", "--max-steps", "1", "--batch-size", "2",
                     "--no-progress")
    assert result.code == 0, result.err
    assert "0 example(s) truncated and 1 dropped at --max-length 64 (policy: drop)" in result.out
    assert read_metrics(tmp_path / "o")[0]["epoch"] == pytest.approx(1.0)  # two examples left, batch of 2


def test_everything_dropped_is_an_input_error(run_cli, no_model_loading, tiny_lm, with_long_example, tmp_path):
    result = run_cli("sft", "--model", tiny_lm, "--data", with_long_example, "--output", tmp_path / "o",
                     "--max-length", "8", "--truncation", "drop")
    assert result.code == 2
    assert result.errors == [f"error: {with_long_example}: every example is longer than --max-length 8 "
                             "and was dropped"]


LONG_PAIR = {"prompt": "Tell me a long story " + "x " * 40, "chosen": "fine", "rejected": "no"}


def test_rm_drop_policy_skips_and_reports(run_cli, tiny_lm, tmp_path):
    path = write_text(tmp_path / "pairs.jsonl", _lines(GOOD_PAIR, LONG_PAIR))
    result = run_cli("rm", "--model", tiny_lm, "--data", path, "--output", tmp_path / "o", "--max-length", "48",
                     "--truncation", "drop", "--max-steps", "1", "--batch-size", "1", "--no-progress")
    assert result.code == 0, result.err
    assert "0 example(s) truncated and 1 dropped at --max-length 48 (policy: drop)" in result.out
    assert read_metrics(tmp_path / "o")[0]["epoch"] == pytest.approx(1.0)  # one comparison left


def test_rm_everything_dropped_is_an_input_error(run_cli, tiny_lm, tmp_path, no_model_loading):
    path = write_text(tmp_path / "long.jsonl", _lines(LONG_PAIR))
    result = run_cli("rm", "--model", tiny_lm, "--data", path, "--output", tmp_path / "o", "--max-length", "48",
                     "--truncation", "drop")
    assert result.code == 2
    assert result.errors == [f"error: {path}: every example is longer than --max-length 48 and was dropped"]
    assert no_model_loading == []


def test_rm_truncate_policy_reports_and_trains(run_cli, tiny_lm, tmp_path):
    path = write_text(tmp_path / "pairs.jsonl", _lines(GOOD_PAIR, LONG_PAIR))
    result = run_cli("rm", "--model", tiny_lm, "--data", path, "--output", tmp_path / "o", "--max-length", "48",
                     "--max-steps", "1", "--batch-size", "2", "--no-progress")
    assert result.code == 0, result.err
    assert "1 example(s) truncated and 0 dropped at --max-length 48 (policy: truncate)" in result.out
    assert read_metrics(tmp_path / "o")[0]["epoch"] == pytest.approx(1.0)


# ------------------------------------------------------------------ empty completion masks


@pytest.fixture(scope="module")
def lm_that_hides_assistant_turns(tmp_path_factory) -> str:
    """A tiny model whose chat template renders no assistant turn: every completion mask is empty."""
    from transformers import AutoTokenizer

    from rlhfkit.models.tiny import make_tiny_causal_lm

    path = make_tiny_causal_lm(tmp_path_factory.mktemp("models") / "hides-assistant")
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] != 'assistant' %}"
                               "{{ m['role'] + ': ' + m['content'] + '\n' }}{% endif %}{% endfor %}")
    tokenizer.save_pretrained(path)
    return path


def test_trainer_refuses_an_empty_completion_mask(run_cli, no_model_loading, lm_that_hides_assistant_turns,
                                                  tmp_path):
    path = write_text(tmp_path / "train.jsonl", _lines(GOOD_SFT, GOOD_SFT))
    result = run_cli("sft", "--model", lm_that_hides_assistant_turns, "--data", path, "--output", tmp_path / "o")
    assert result.code == 2
    assert result.errors == [f"error: {path}:{n}: field 'completion': the completion mask is empty after "
                             "tokenisation (nothing to train on)" for n in (1, 2)]
    assert no_model_loading == []
