"""``rlhfkit inspect-data``: one example token by token, the trained tokens in [brackets]."""

from __future__ import annotations

import re

import pytest

from core_helpers import write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


def _token_line(out: str) -> str:
    return out.splitlines()[2]


def test_preference_file_shows_chosen_then_rejected(run_cli, tiny_lm, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi", "chosen": "Yo", "rejected": "No"}])
    result = run_cli("inspect-data", "--model", tiny_lm, "--data", path, "--index", "1", "--no-color")
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert lines[0] == f"example 1 of 2: {path}:1 rejected"
    # <|im_start|> user \n H i <|im_end|> \n <|im_start|> a s s i s t a n t \n = 21 prompt tokens
    assert lines[1] == "25 tokens, 4 trained; trained tokens in [brackets], others end with |"
    assert lines[2] == ("<|im_start|>|u|s|e|r|\\n|H|i|<|im_end|>|\\n|<|im_start|>|a|s|s|i|s|t|a|n|t|\\n|"
                        "[N][o][<|im_end|>][\\n]")
    assert "warning" not in result.out


def test_multi_turn_marks_every_assistant_turn(run_cli, tiny_lm, tmp_path):
    messages = [{"role": "user", "content": "u1"}, {"role": "assistant", "content": "A"},
                {"role": "user", "content": "u2"}, {"role": "assistant", "content": "B"}]
    path = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "x", "completion": "y"}, {"messages": messages}])
    result = run_cli("inspect-data", "--model", tiny_lm, "--data", path, "--index", "1", "--no-color")
    assert result.code == 0, result.err
    line = _token_line(result.out)
    assert re.findall(r"(?:\[[^\]]*\])+", line) == ["[A][<|im_end|>][\\n]", "[B][<|im_end|>][\\n]"]
    assert "u|2|" in line  # the second user turn is shown untrained
    assert "6 trained" in result.out.splitlines()[1]


def test_prompt_only_records_show_nothing_trained(run_cli, tiny_lm, tmp_path):
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Just asking"}])
    result = run_cli("inspect-data", "--model", tiny_lm, "--data", path, "--no-color")
    assert result.code == 0
    assert result.out.splitlines()[0] == f"example 0 of 1: {path}:1 (prompt only)"
    assert "[" not in _token_line(result.out).replace("<|im_start|>", "")
    assert ", 0 trained" in result.out


def test_truncation_is_shown(run_cli, tiny_lm, tmp_path):
    path = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "a" * 50, "completion": "b" * 5}])
    result = run_cli("inspect-data", "--model", tiny_lm, "--data", path, "--max-length", "20", "--no-color")
    assert result.code == 0
    assert result.out.splitlines()[1].startswith("20 tokens, 7 trained (truncated)")


def test_empty_mask_and_missing_eos_are_flagged(run_cli, tmp_path):
    from transformers import AutoTokenizer

    from rlhfkit.models.tiny import make_tiny_causal_lm

    model = make_tiny_causal_lm(tmp_path / "m")
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.chat_template = "{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['content'] }}" \
                              "{% endif %}{% endfor %}"
    tokenizer.save_pretrained(model)
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "completion": "a"}])
    result = run_cli("inspect-data", "--model", model, "--data", path, "--no-color")
    assert result.code == 0
    assert "warning: the completion mask is empty: this example would be refused" in result.out
    assert "warning: no EOS among the trained tokens" in result.out


def test_index_out_of_range_and_bad_data_exit_2(run_cli, tiny_lm, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi", "chosen": "Yo", "rejected": "No"}])
    result = run_cli("inspect-data", "--model", tiny_lm, "--data", path, "--index", "2")
    assert result.code == 2
    assert result.errors == ["error: --index 2: the file has 2 example(s)"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Hi", "chosen": "Yo", "rejected": "Yo"}\n')
    result = run_cli("inspect-data", "--model", tiny_lm, "--data", bad)
    assert result.code == 2
    assert result.errors == [f"error: {bad}:1: field 'chosen': identical to 'rejected': the pair carries no "
                             "preference"]
