"""How a process reward model reads a chain: the separator after every step at a known position
(also where the tokenizer merges it with its neighbours), truncation, splitting and aggregates."""

from __future__ import annotations

import pytest
import torch

from rlhfkit.errors import InputError
from rlhfkit.models.loading import load_tokenizer
from rlhfkit.models.prm import AGGREGATES, encode_steps, separator_ids, split_steps, step_batch
from rlhfkit.models.tiny import make_tiny_tokenizer

# ".\n", "\n\n" and "3\n" become single tokens: in the joined text a step's separator disappears
# into the token before it (as SmolLM2's tokenizer merges "\n\n").
MERGES = [("Ċ", "Ċ"), (".", "Ċ"), ("3", "Ċ")]
PROMPT = "Add them up.\n"
STEPS = ["1 + 2 = 3", "3 + 3 = 6.", "6 * 2 = 12\n"]


def joined(prompt: str, steps: list[str], sep: str = "\n") -> str:
    return prompt + sep + "".join(s + sep for s in steps)


def test_the_merging_tokenizer_hides_separators_in_the_joined_text():
    tok = make_tiny_tokenizer(chat_template=False, merges=MERGES)
    newline = tok.convert_tokens_to_ids("Ċ")
    naive = tok(joined(PROMPT, STEPS), add_special_tokens=False)["input_ids"]
    assert naive.count(newline) < len(STEPS)  # finding the separators in these ids would miss steps
    assert tok.convert_tokens_to_ids("ĊĊ") in naive and tok.convert_tokens_to_ids("3Ċ") in naive


def test_each_step_ends_exactly_at_its_own_separator_token():
    tok = make_tiny_tokenizer(chat_template=False, merges=MERGES)
    newline = tok.convert_tokens_to_ids("Ċ")
    enc = encode_steps(tok, PROMPT, STEPS, "\n")
    assert len(enc.step_ends) == len(STEPS) and not enc.truncated
    assert [enc.input_ids[e] for e in enc.step_ends] == [newline] * len(STEPS)
    assert enc.step_ends[-1] == len(enc.input_ids) - 1
    for i, end in enumerate(enc.step_ends):  # everything up to the verdict on step i, and nothing after it
        assert tok.decode(enc.input_ids[:end + 1]) == joined(PROMPT, STEPS[:i + 1])
    batch = step_batch([enc], pad_id=0, labels=[[True, False, None]])
    labelled = (batch["labels"][0] != -100).nonzero().flatten().tolist()
    assert labelled == enc.step_ends[:2]
    assert batch["labels"][0, enc.step_ends[:2]].tolist() == [1, 0]


def test_a_multi_token_separator_is_read_at_its_last_token():
    tok = make_tiny_tokenizer(chat_template=False)
    enc = encode_steps(tok, "q", ["a", "bc"], " ki")
    assert tok.decode(enc.input_ids) == "q kia kibc ki"
    assert [tok.decode(enc.input_ids[:e + 1]) for e in enc.step_ends] == ["q kia ki", "q kia kibc ki"]


@pytest.mark.slow
def test_smollm2_tokenizer_merges_newlines_and_the_positions_stay_exact():
    tok = load_tokenizer("smollm2-135m")
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    assert len(newline) == 1 and len(tok("\n\n", add_special_tokens=False)["input_ids"]) == 1  # "\n\n" is one token
    steps = ["7 + 5 = 12\n", "12 * 3 = 36"]
    enc = encode_steps(tok, "Start with 7.", steps, "\n")
    assert [enc.input_ids[e] for e in enc.step_ends] == newline * 2
    assert tok.decode(enc.input_ids) == joined("Start with 7.", steps)


def test_an_encoder_without_a_newline_token_reads_its_sep_token():
    tok = load_tokenizer("minilm-l6")
    assert tok("\n", add_special_tokens=False)["input_ids"] == []  # WordPiece drops whitespace
    assert separator_ids(tok, "\n") == [tok.sep_token_id]
    enc = encode_steps(tok, "start with 7", ["7 + 5 = 12", "12 * 3 = 36"], "\n")
    assert enc.input_ids[0] == tok.cls_token_id
    assert [enc.input_ids[e] for e in enc.step_ends] == [tok.sep_token_id] * 2
    assert tok.convert_ids_to_tokens(enc.input_ids[enc.step_ends[0] - 1]) == "12"


def test_a_separator_that_is_no_token_and_no_sep_token_is_an_input_error():
    tok = make_tiny_tokenizer(chat_template=False)
    with pytest.raises(InputError, match="choose a visible separator"):
        separator_ids(tok, "")


def test_truncation_cuts_the_prompt_start_then_the_last_steps():
    tok = make_tiny_tokenizer(chat_template=False)  # one token per byte
    full = encode_steps(tok, "0123456789", ["ab", "cd", "ef"], "\n")
    assert len(full.input_ids) == 11 + 9
    cut = encode_steps(tok, "0123456789", ["ab", "cd", "ef"], "\n", max_length=14)
    assert cut.truncated and tok.decode(cut.input_ids) == "6789\nab\ncd\nef\n"
    shorter = encode_steps(tok, "0123456789", ["ab", "cd", "ef"], "\n", max_length=7)
    assert shorter.truncated and tok.decode(shorter.input_ids) == "\nab\ncd\n" and len(shorter.step_ends) == 2
    assert encode_steps(tok, "0123456789", ["ab", "cd", "ef"], "\n", max_length=20) == full


def test_split_steps_and_the_aggregates():
    assert split_steps("1 + 1 = 2\n\n2 * 3 = 6\n  \n", "\n") == ["1 + 1 = 2", "2 * 3 = 6"]
    assert split_steps("a ki b", " ki") == ["a", "b"]
    probs = [0.9, 0.5, 0.8]
    assert AGGREGATES["min"](probs) == 0.5
    assert AGGREGATES["prod"](probs) == pytest.approx(0.36)
    assert AGGREGATES["last"](probs) == 0.8


def test_step_batch_pads_on_the_right():
    tok = make_tiny_tokenizer(chat_template=False)
    a, b = encode_steps(tok, "q", ["a"], "\n"), encode_steps(tok, "qq", ["a", "b"], "\n")
    batch = step_batch([a, b], pad_id=0)
    assert batch["input_ids"].shape == (2, len(b.input_ids))
    assert batch["attention_mask"].sum(-1).tolist() == [len(a.input_ids), len(b.input_ids)]
    assert torch.equal(batch["input_ids"][0, :len(a.input_ids)], torch.tensor(a.input_ids))
