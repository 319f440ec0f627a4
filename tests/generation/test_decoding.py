"""Decoding strategies against first principles on a tiny random model."""

from __future__ import annotations

import pytest
import torch

from rlhfkit.data.chat import encode_prompt
from rlhfkit.generation.decoding import SamplingParams, generate_ids
from rlhfkit.models.loading import load_policy
from rlhfkit.models.tiny import make_tiny_causal_lm

PROMPTS = ["hello", "a somewhat longer prompt, to exercise left padding", "x"]


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    path = make_tiny_causal_lm(tmp_path_factory.mktemp("tiny") / "model", seed=3)
    model, tokenizer = load_policy(path)
    return model, tokenizer, [encode_prompt(tokenizer, p) for p in PROMPTS]


@torch.no_grad()
def argmax_loop(model, prompt: list[int], max_new_tokens: int, eos: int, pad: int) -> list[int]:
    """Greedy decoding by hand: full forward each step, no cache, argmax of the last logits."""
    ids, out = list(prompt), []
    for _ in range(max_new_tokens):
        token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        if token == pad:  # generate_ids ends a response at a sampled padding token
            break
        out.append(token)
        ids.append(token)
        if token == eos:
            break
    return out


def greedy(model, tokenizer, prompt_ids, max_new_tokens=12):
    params = SamplingParams(strategy="greedy", max_new_tokens=max_new_tokens)
    return [rows[0] for rows in generate_ids(model, tokenizer, prompt_ids, params, batch_size=8)]


def test_greedy_equals_a_hand_written_argmax_loop(policy):
    model, tokenizer, prompt_ids = policy
    batched = greedy(model, tokenizer, prompt_ids)  # one left-padded batch with the KV cache
    for prompt, got in zip(prompt_ids, batched):
        assert got == argmax_loop(model, prompt, 12, tokenizer.eos_token_id, tokenizer.pad_token_id)
        assert len(got) > 0


def test_greedy_n_copies(policy):
    model, tokenizer, prompt_ids = policy
    out = generate_ids(model, tokenizer, prompt_ids[:1], SamplingParams(strategy="greedy", n=3, max_new_tokens=6))
    assert len(out[0]) == 3 and out[0][0] == out[0][1] == out[0][2]


def test_beam_search_with_one_beam_equals_greedy(policy):
    model, tokenizer, prompt_ids = policy
    params = SamplingParams(strategy="beam", num_beams=1, n=1, max_new_tokens=12)
    beams = [rows[0] for rows in generate_ids(model, tokenizer, prompt_ids, params)]
    assert beams == greedy(model, tokenizer, prompt_ids)


def test_beam_search_returns_n_distinct_beams(policy):
    model, tokenizer, prompt_ids = policy
    params = SamplingParams(strategy="beam", num_beams=4, n=3, max_new_tokens=8)
    out = generate_ids(model, tokenizer, prompt_ids, params)
    assert all(len(rows) == 3 and len({tuple(r) for r in rows}) == 3 for rows in out)


def test_top_k_one_sampling_equals_greedy(policy):
    model, tokenizer, prompt_ids = policy
    params = SamplingParams(strategy="sample", top_k=1, n=3, seed=0, max_new_tokens=12, temperature=1.7)
    sampled = generate_ids(model, tokenizer, prompt_ids, params)
    for rows, expected in zip(sampled, greedy(model, tokenizer, prompt_ids)):
        assert rows == [expected] * 3


@pytest.mark.parametrize("k", [1, 5])
def test_top_k_never_samples_outside_the_top_k(policy, k):
    model, tokenizer, prompt_ids = policy
    prompt = prompt_ids[1]
    with torch.no_grad():
        allowed = set(model(torch.tensor([prompt])).logits[0, -1].topk(k).indices.tolist())
    params = SamplingParams(strategy="sample", top_k=k, n=400, seed=1, max_new_tokens=1, temperature=2.0)
    first = [r[0] if r else tokenizer.pad_token_id for r in generate_ids(model, tokenizer, [prompt], params)[0]]
    assert set(first) <= allowed
    assert len(set(first)) == k  # 400 draws at temperature 2 reach every allowed token


def test_sampling_is_seeded_and_varied(policy):
    model, tokenizer, prompt_ids = policy
    params = SamplingParams(strategy="sample", n=4, seed=7, max_new_tokens=8)
    a = generate_ids(model, tokenizer, prompt_ids, params)
    b = generate_ids(model, tokenizer, prompt_ids, params)
    assert a == b
    assert len({tuple(r) for r in a[0]}) > 1


def test_top_p_and_min_p_near_their_limits_are_greedy(policy):
    model, tokenizer, prompt_ids = policy
    expected = greedy(model, tokenizer, prompt_ids, 6)
    for kw in ({"top_p": 1e-6}, {"min_p": 0.999}):
        params = SamplingParams(strategy="sample", n=2, seed=0, max_new_tokens=6, **kw)
        assert [rows[0] for rows in generate_ids(model, tokenizer, prompt_ids, params)] == expected, kw


def test_decoding_copy_is_a_bfloat16_twin_that_leaves_the_model_alone(policy, monkeypatch):
    from rlhfkit.generation import decoding
    from rlhfkit.generation.decoding import decoding_copy

    model, tokenizer, prompt_ids = policy
    assert decoding_copy(model, "float32") is model
    twin = decoding_copy(model, "bfloat16")
    assert twin is not model and next(twin.parameters()).dtype == torch.bfloat16
    assert next(model.parameters()).dtype == torch.float32  # the original is untouched
    for (name, a), (_, b) in zip(model.named_parameters(), twin.named_parameters()):
        assert torch.equal(a.detach().to(torch.bfloat16), b.detach()), name
    # it decodes: greedy on the twin gives token ids in the vocabulary, cut at EOS like the original
    rows = greedy(twin, tokenizer, prompt_ids)
    assert len(rows) == len(prompt_ids) and all(0 <= t < model.config.vocab_size for r in rows for t in r)
    # auto: a copy only where the CPU multiplies bfloat16 natively
    monkeypatch.setattr(decoding, "cpu_has_native_bf16", lambda: False)
    assert decoding_copy(model, "auto") is model
    monkeypatch.setattr(decoding, "cpu_has_native_bf16", lambda: True)
    assert next(decoding_copy(model, "auto").parameters()).dtype == torch.bfloat16
    assert decoding_copy(twin, "auto") is twin  # already bfloat16
    with pytest.raises(ValueError, match="unknown decoding dtype"):
        decoding_copy(model, "float16")


def test_decode_loop_equals_transformers_generate(policy):
    """Greedy (with a repetition penalty) through the lean loop gives generate's tokens, row for
    row, on a left-padded batch; the logits and hidden states it keeps are a full forward's."""
    from rlhfkit.data.collate import pad_batch
    from rlhfkit.generation.decoding import decode_loop, generation_kwargs

    model, tokenizer, prompt_ids = policy
    ids, mask = pad_batch(prompt_ids, tokenizer.pad_token_id, side="left")
    params = SamplingParams(strategy="greedy", max_new_tokens=10, repetition_penalty=1.3)
    with torch.no_grad():
        expected = model.generate(input_ids=ids, attention_mask=mask, **generation_kwargs(params, tokenizer))
        got = decode_loop(model, ids, mask, params, [tokenizer.eos_token_id], tokenizer.pad_token_id,
                          with_logits=True, with_hidden=True)
        assert torch.equal(got.ids, expected[:, ids.shape[1]:])
        full = torch.cat([ids, got.ids], 1)
        out = model(input_ids=full, output_hidden_states=True)
    # the rows without left padding against a plain forward of prompt and response (causal: a pad
    # token after an EOS changes nothing before it)
    width = got.ids.shape[1]
    unpadded = [row for row in range(len(prompt_ids)) if mask[row].all()]
    assert unpadded
    for row in unpadded:
        logits = out.logits[row, ids.shape[1] - 1:ids.shape[1] - 1 + width]
        hidden = out.hidden_states[-1][row, ids.shape[1] - 1:ids.shape[1] - 1 + width]
        assert torch.allclose(got.logits[row], logits, atol=1e-4)
        assert torch.allclose(got.hidden[row], hidden, atol=1e-4)


def test_draw_tokens_draws_each_token_with_its_probability():
    from rlhfkit.generation.decoding import draw_tokens

    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    torch.manual_seed(0)
    draws = draw_tokens(probs.log().expand(100_000, -1).contiguous())
    freq = torch.bincount(draws, minlength=5).double() / len(draws)
    stderr = (probs.double() * (1 - probs.double()) / len(draws)).sqrt()
    assert (freq - probs.double()).abs().le(4 * stderr + 1e-12).all(), freq
    assert freq[4] == 0  # probability 0 (a filtered token) is never drawn


def test_a_stopping_criterion_ends_its_row_and_decoding_stops_when_all_have_ended(policy):
    from rlhfkit.data.collate import pad_batch
    from rlhfkit.generation.decoding import decode_loop

    model, tokenizer, prompt_ids = policy
    ids, mask = pad_batch(prompt_ids, tokenizer.pad_token_id, side="left")
    prompt_len = ids.shape[1]

    def stop_first_row_after_two(seq, scores):  # row 0 after its 2nd token, every row after the 4th
        new = seq.shape[1] - prompt_len
        return torch.tensor([new >= 2 if r == 0 else new >= 4 for r in range(seq.shape[0])])

    params = SamplingParams(strategy="sample", max_new_tokens=12, seed=0)
    torch.manual_seed(0)
    got = decode_loop(model, ids, mask, params, [], tokenizer.pad_token_id, stop_first_row_after_two).ids
    assert got.shape == (len(prompt_ids), 4)
    assert (got[0, 2:] == tokenizer.pad_token_id).all()


def test_decoding_copy_follows_the_policy_weights(policy):
    from rlhfkit.generation.decoding import DecodingCopy

    model, _, _ = policy
    same = DecodingCopy(model, "float32")
    assert not same.is_copy and same.current() is model
    sampler = DecodingCopy(model, "bfloat16")
    weight = model.get_output_embeddings().weight
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.add_(0.5)
        twin = sampler.current()
        assert twin is not model
        for (name, a), (_, b) in zip(model.named_parameters(), twin.named_parameters()):
            assert torch.equal(a.detach().to(torch.bfloat16), b.detach()), name
    finally:
        with torch.no_grad():
            weight.copy_(saved)


def test_copies_share_one_prefill_and_equal_repeated_prompt_rows(policy):
    """``copies=3`` encodes each prompt once and repeats its cache: the same logits (and so the same
    samples for the same random draws) as three copies of each prompt row."""
    from rlhfkit.data.collate import pad_batch
    from rlhfkit.generation.decoding import decode_loop

    model, tokenizer, prompt_ids = policy
    ids, mask = pad_batch(prompt_ids, tokenizer.pad_token_id, side="left")
    params = SamplingParams(strategy="sample", max_new_tokens=8, temperature=1.3)
    torch.manual_seed(5)
    shared = decode_loop(model, ids, mask, params, [], tokenizer.pad_token_id, copies=3, with_logits=True)
    torch.manual_seed(5)
    repeated = decode_loop(model, ids.repeat_interleave(3, 0), mask.repeat_interleave(3, 0), params, [],
                           tokenizer.pad_token_id, with_logits=True)
    assert torch.equal(shared.ids, repeated.ids)
    torch.testing.assert_close(shared.logits, repeated.logits, atol=1e-5, rtol=0)
    assert len({tuple(r) for r in shared.ids[:3].tolist()}) > 1  # the copies of a prompt are distinct samples
