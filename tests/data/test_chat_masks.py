"""Chat templates and completion masks: only assistant tokens are trained (every assistant turn of a
multi-turn conversation, no user turn), the pieces add up to the template's own rendering, and the
truncation policy keeps the latest context."""

from __future__ import annotations

import pytest

from rlhfkit.data.chat import check_encodable, encode, encode_prompt, raw_text_ids, render_prompt, segments
from rlhfkit.data.schema import SFTExample
from rlhfkit.errors import InputError
from rlhfkit.models.tiny import make_tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer(chat_template=True)


@pytest.fixture(scope="module")
def base_tok():
    return make_tiny_tokenizer(chat_template=False)


def _split(tokenizer, enc):
    trained = tokenizer.decode([t for t, m in zip(enc.input_ids, enc.trained) if m])
    untrained = tokenizer.decode([t for t, m in zip(enc.input_ids, enc.trained) if not m])
    return trained, untrained


def _conversation(*pairs):
    return [{"role": role, "content": content} for role, content in pairs]


def test_single_turn_trains_only_the_reply_and_its_end_token(tok):
    enc = encode(tok, "What is 2+2?", "4, of course.")
    trained, untrained = _split(tok, enc)
    assert trained == "4, of course.<|im_end|>\n"
    assert untrained == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    # trained tokens form one block at the end; the prompt length is where it starts
    assert enc.trained == [False] * enc.prompt_length + [True] * (len(enc.trained) - enc.prompt_length)
    assert tok.eos_token_id in [t for t, m in zip(enc.input_ids, enc.trained) if m]


def test_the_pieces_add_up_to_the_template_rendering(tok):
    prompt = _conversation(("system", "Be kind."), ("user", "Hi"))
    completion = _conversation(("assistant", "Hello"), ("user", "Bye"), ("assistant", "Goodbye"))
    enc = encode(tok, prompt, completion)
    full = tok.apply_chat_template(prompt + completion, tokenize=False)
    assert tok.decode(enc.input_ids) == full
    assert enc.input_ids == tok(full, add_special_tokens=False)["input_ids"]
    assert "".join(text for text, _ in segments(tok, prompt, completion)) == full


def test_multi_turn_trains_every_assistant_turn_and_no_user_turn(tok):
    prompt = _conversation(("user", "first question"))
    completion = _conversation(("assistant", "FIRST ANSWER"), ("user", "second question"),
                               ("assistant", "SECOND ANSWER"))
    enc = encode(tok, prompt, completion)
    trained, untrained = _split(tok, enc)
    assert trained == "FIRST ANSWER<|im_end|>\nSECOND ANSWER<|im_end|>\n"
    assert "second question" in untrained and "first question" in untrained
    assert untrained.count("<|im_start|>assistant\n") == 2  # the headers of both replies are not trained
    # two separate trained blocks: False.. True.. False.. True..
    changes = sum(1 for a, b in zip(enc.trained, enc.trained[1:]) if a != b)
    assert changes == 3


def test_sft_conversation_record_is_split_at_the_first_reply(tmp_path, tok):
    from core_helpers import write_jsonl
    from rlhfkit.data.schema import load_sft

    messages = _conversation(("system", "s"), ("user", "u1"), ("assistant", "a1"), ("user", "u2"),
                             ("assistant", "a2"))
    (ex,) = load_sft(write_jsonl(tmp_path / "c.jsonl", [{"messages": messages}]))
    trained, _ = _split(tok, encode(tok, ex.prompt, ex.completion))
    assert trained == "a1<|im_end|>\na2<|im_end|>\n"


def test_string_prompt_becomes_a_user_turn_with_a_template(tok):
    assert render_prompt(tok, "hey") == "<|im_start|>user\nhey<|im_end|>\n<|im_start|>assistant\n"
    ids = encode_prompt(tok, "hey")
    assert tok.decode(ids) == render_prompt(tok, "hey")
    assert encode_prompt(tok, "hey", max_length=5) == ids[-5:]  # long prompts keep their end


def test_base_model_without_template_uses_raw_text_and_eos(base_tok):
    enc = encode(base_tok, "The sky is", " blue")
    trained, untrained = _split(base_tok, enc)
    assert untrained == "The sky is"
    assert trained == " blue" + base_tok.eos_token
    with pytest.raises(ValueError, match="chat template"):
        encode(base_tok, _conversation(("user", "x")), "y")


def test_truncation_cuts_the_prompt_from_the_left_then_the_completion(tok):
    full = encode(tok, "A" * 40, "B" * 10)
    assert not full.truncated
    n_completion = sum(full.trained)
    cut = encode(tok, "A" * 40, "B" * 10, max_length=30)
    assert cut.truncated and len(cut.input_ids) == 30
    assert cut.input_ids[-n_completion:] == full.input_ids[-n_completion:]  # the completion is whole
    assert cut.input_ids == full.input_ids[-30:]                            # the prompt lost its start
    assert sum(cut.trained) == n_completion

    # when even one prompt token plus the completion does not fit, the completion is cut at the end
    tight = encode(tok, "A" * 40, "B" * 10, max_length=5)
    assert tight.truncated and len(tight.input_ids) == 5
    assert tight.trained == [False, True, True, True, True]
    assert tight.input_ids[1:] == full.input_ids[full.prompt_length:full.prompt_length + 4]

    assert encode(tok, "A" * 40, "B" * 10, max_length=30, truncation="drop") is None
    assert encode(tok, "A", "B", max_length=30, truncation="drop").truncated is False


def test_check_encodable_names_examples_with_an_empty_mask(tok):
    hiding = make_tiny_tokenizer()
    hiding.chat_template = ("{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['content'] }}"
                            "{% endif %}{% endfor %}")
    examples = [SFTExample("p", "c"), SFTExample("q", "d")]
    with pytest.raises(InputError) as e:
        check_encodable(hiding, examples, lambda ex, msg: f"{ex.prompt}: {msg}")
    assert e.value.problems == [f"{p}: the completion mask is empty: no token would be trained" for p in "pq"]
    check_encodable(tok, examples, lambda ex, msg: msg)  # a proper template passes


def test_a_template_that_rewrites_history_is_refused(tok):
    # a template that drops earlier assistant turns is not prefix-stable: the mask cannot be exact
    odd = make_tiny_tokenizer()
    odd.chat_template = ("{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
                         "{{ m['role'] + ':' + m['content'] + '\n' }}{% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}assistant:{% endif %}")
    with pytest.raises(ValueError, match="prefix-stable"):
        encode(odd, "q", _conversation(("assistant", "a"), ("user", "u"), ("assistant", "b")))


def test_one_bos_rule_raw_text_only():
    """A tokenizer that adds BOS (id 1 here): raw text gets it once, in front (a base model's
    prompt, its training sequence); text a chat template rendered gets nothing added."""
    raw = make_tiny_tokenizer(chat_template=False)
    raw.add_bos_token = True
    text_ids = raw("hi", add_special_tokens=False)["input_ids"]
    assert raw_text_ids(raw, "hi") == [1] + text_ids
    assert encode_prompt(raw, "hi") == [1] + text_ids
    enc = encode(raw, "hi", "yo")
    assert enc.input_ids[:len(text_ids) + 1] == [1] + text_ids and enc.input_ids.count(1) == 1
    assert raw_text_ids(make_tiny_tokenizer(chat_template=False), "hi") == text_ids  # no add_bos_token
    templated = make_tiny_tokenizer(chat_template=True)
    templated.add_bos_token = True
    rendered = templated(render_prompt(templated, "hi"), add_special_tokens=False)["input_ids"]
    assert encode_prompt(templated, "hi") == rendered  # the template's own <|im_start|>, nothing more
