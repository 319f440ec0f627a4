"""Log-probs, echo and token-id prompts: what evaluators (lm-eval's ``local-completions``) ask of the server.

Every value is checked against a plain forward of the same tiny model and ``log_softmax`` written
out here (an independent reference for the server's ``token_logps`` path).
"""

import httpx
import pytest
import torch

from rlhfkit.data.chat import encode_prompt
from rlhfkit.generation.decoding import SamplingParams, generate_ids
from rlhfkit.models.token_scores import score_tokens

_HTTP = httpx.Client(timeout=120)


def _complete(server, **body):
    r = _HTTP.post(server.url + "/v1/completions", json={"model": "tiny", **body})
    assert r.status_code == 200, r.text
    return r.json()


def _reference(model, ids: list[int]) -> torch.Tensor:
    """``[len(ids) - 1, V]``: log-softmax of the logits that predict tokens 1.. of ``ids``."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1)


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]  # this tokenizer adds no BOS


def test_echo_scores_the_prompt_as_a_direct_forward(server, policy):
    model, tok = policy
    prompt = "The cat sat on the mat."
    ids = _ids(tok, prompt)
    out = _complete(server, prompt=prompt, echo=True, logprobs=3, max_tokens=0)
    (choice,) = out["choices"]
    lp = choice["logprobs"]
    assert choice["text"] == prompt and choice["finish_reason"] == "length"
    assert out["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
    assert lp["tokens"] == [tok.decode([t]) for t in ids]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    ref = _reference(model, ids)
    expected = [ref[t - 1, ids[t]].item() for t in range(1, len(ids))]
    assert lp["token_logprobs"][1:] == pytest.approx(expected, abs=1e-5)
    for t in range(1, len(ids)):
        top = lp["top_logprobs"][t]
        values, best = ref[t - 1].topk(3)
        for v, i in zip(values.tolist(), best.tolist()):
            if tok.decode([i]) != "\ufffd":  # bytes >= 0x80 of the byte-level tokenizer share that text
                assert top[tok.decode([i])] == pytest.approx(v, abs=1e-5)
        assert top[lp["tokens"][t]] == pytest.approx(lp["token_logprobs"][t], abs=1e-6)  # the chosen one is there
        assert len(top) <= 4
    # text_offset: where each token's text starts in the echoed text
    assert lp["text_offset"] == [sum(len(x) for x in lp["tokens"][:t]) for t in range(len(ids))]
    assert "".join(lp["tokens"]) == choice["text"]


def test_prompt_forms_agree_and_batches_equal_single_requests(server, policy):
    _, tok = policy
    texts = ["Hello there, friend", "ab", "A longer third prompt, to pad the others"]
    ids = [_ids(tok, t) for t in texts]
    kw = dict(echo=True, logprobs=1, max_tokens=0)
    single = [_complete(server, prompt=t, **kw)["choices"][0]["logprobs"] for t in texts]
    as_strings = [c["logprobs"] for c in _complete(server, prompt=texts, **kw)["choices"]]
    as_batch = [c["logprobs"] for c in _complete(server, prompt=ids, **kw)["choices"]]
    as_ids = [_complete(server, prompt=i, **kw)["choices"][0]["logprobs"] for i in ids]
    for one, a, b, c in zip(single, as_strings, as_batch, as_ids):
        assert one["tokens"] == a["tokens"] == b["tokens"] == c["tokens"]
        for other in (a, b, c):  # right-padded batches of different lengths give the same numbers
            assert other["token_logprobs"][0] is None
            assert other["token_logprobs"][1:] == pytest.approx(one["token_logprobs"][1:], abs=1e-5)
    echoed = _complete(server, prompt=ids, **kw)["choices"]
    assert [c["text"] for c in echoed] == texts  # a token-id prompt is echoed as its decoding


def test_generated_tokens_greedy_top_is_the_chosen_token(server, policy):
    model, tok = policy
    prompt = "Once upon a time"
    ids = _ids(tok, prompt)
    out = _complete(server, prompt=prompt, logprobs=2, max_tokens=8, temperature=0)
    (choice,) = out["choices"]
    lp = choice["logprobs"]
    (generated,) = generate_ids(model, tok, [ids], SamplingParams(strategy="greedy", max_new_tokens=8))[0]
    assert lp["tokens"] == [tok.decode([t], skip_special_tokens=False) for t in generated]
    ref = _reference(model, ids + generated)
    expected = [ref[len(ids) - 1 + k, t].item() for k, t in enumerate(generated)]
    assert lp["token_logprobs"] == pytest.approx(expected, abs=1e-5)
    for value, top in zip(lp["token_logprobs"], lp["top_logprobs"]):
        assert max(top.values()) == value  # greedy: the chosen token is the most likely, to the last bit
    # without echo the offsets count from the end of the prompt text
    assert lp["text_offset"][0] == len(prompt)
    assert lp["text_offset"] == [len(prompt) + sum(len(x) for x in lp["tokens"][:k]) for k in range(len(generated))]


def test_loglikelihood_request_as_lm_eval_sends_it(server, policy):
    """lm-eval: token ids of context + continuation, echo, logprobs=1, max_tokens=1, temperature 0;
    it sums token_logprobs[ctxlen:-1] (the last entry is the generated token)."""
    model, tok = policy
    context, continuation = _ids(tok, "Question: 2+2? Answer:"), _ids(tok, " four")
    out = _complete(server, prompt=[context + continuation], echo=True, logprobs=1, max_tokens=1, temperature=0,
                    seed=1234)
    lp = out["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(context) + len(continuation) + 1
    ref = _reference(model, context + continuation)
    expected = sum(ref[len(context) - 1 + k, t].item() for k, t in enumerate(continuation))
    assert sum(lp["token_logprobs"][len(context):-1]) == pytest.approx(expected, abs=1e-5)
    assert out["usage"]["completion_tokens"] == 1


def test_n_greedy_choices_share_their_scores(server):
    out = _complete(server, prompt="abc", logprobs=1, max_tokens=4, temperature=0, n=3)
    first = out["choices"][0]["logprobs"]
    assert all(c["logprobs"] == first for c in out["choices"])
    assert len(first["tokens"]) == out["usage"]["completion_tokens"] // 3


def test_chat_logprobs_match_a_direct_forward(server, policy):
    model, tok = policy
    messages = [{"role": "user", "content": "Name a colour."}]
    r = _HTTP.post(server.url + "/v1/chat/completions",
                   json={"model": "tiny", "messages": messages, "logprobs": True, "top_logprobs": 3,
                         "max_tokens": 6, "temperature": 0})
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["logprobs"]["content"]
    prompt = encode_prompt(tok, messages)
    (generated,) = generate_ids(model, tok, [prompt], SamplingParams(strategy="greedy", max_new_tokens=6))[0]
    assert [c["token"] for c in content] == [tok.decode([t], skip_special_tokens=False) for t in generated]
    ref = _reference(model, prompt + generated)
    for k, (entry, t) in enumerate(zip(content, generated)):
        assert entry["logprob"] == pytest.approx(ref[len(prompt) - 1 + k, t].item(), abs=1e-5)
        assert entry["bytes"] == list(entry["token"].encode("utf-8"))
        tops = entry["top_logprobs"]
        assert len(tops) == 3
        assert [x["logprob"] for x in tops] == sorted((x["logprob"] for x in tops), reverse=True)
        assert tops[0]["logprob"] == entry["logprob"]  # greedy
        assert [x["logprob"] for x in tops] == pytest.approx(ref[len(prompt) - 1 + k].topk(3).values.tolist(),
                                                            abs=1e-5)
    plain = _HTTP.post(server.url + "/v1/chat/completions",
                       json={"model": "tiny", "messages": messages, "logprobs": True, "max_tokens": 6,
                             "temperature": 0}).json()
    assert all(e["top_logprobs"] == [] for e in plain["choices"][0]["logprobs"]["content"])


def test_a_judge_reads_the_servers_logprobs_like_a_local_models(server, tiny_path):
    """ai-label's soft label p_chosen reads chat log-probs through the endpoint backend: rlhfkit serve
    now gives them, equal to the local backend's teacher-forced ones."""
    from rlhfkit.models.backends import LocalBackend, OpenAIChatBackend

    chats = [[{"role": "user", "content": "Which is better, A or B?"}]]
    remote = OpenAIChatBackend(server.base_url, "tiny")
    try:
        (reply,) = remote.reply(chats, temperature=0.0, max_tokens=5, top_logprobs=3)
    finally:
        remote.close()
    assert remote.logprobs_supported and len(reply.logprobs) == 5
    (local,) = LocalBackend(tiny_path).reply(chats, temperature=0.0, max_tokens=5, top_logprobs=3)
    assert [t.token for t in reply.logprobs] == [t.token for t in local.logprobs]
    for a, b in zip(reply.logprobs, local.logprobs):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-5)
        assert max(a.top.values()) == pytest.approx(max(b.top.values()), abs=1e-5)


def test_score_tokens_counts_and_starts(policy):
    model, tok = policy
    seqs = [_ids(tok, "abcdef"), _ids(tok, "xy"), [5]]
    scores = score_tokens(model, seqs, [3, 1, 1], top=2, pad_id=tok.pad_token_id, batch_size=2)
    assert [s.token_ids for s in scores] == [seqs[0][3:], seqs[1][1:], []]
    ref = _reference(model, seqs[0])
    assert scores[0].logps == pytest.approx([ref[t - 1, seqs[0][t]].item() for t in range(3, 6)], abs=1e-5)
    assert [len(t) for t in scores[0].top] == [2, 2, 2]
    with pytest.raises(ValueError, match="starts"):
        score_tokens(model, seqs, [0, 1, 1])


def test_concurrent_scoring_requests_share_one_forward_and_equal_single_ones(server):
    """Three lm-eval-style scoring requests (max_tokens 0, echo) waiting together run as one batch,
    with the same numbers as each alone; a generating request is not mixed in."""
    import threading
    import time

    engine = server.engine
    prompts = ["short", "a somewhat longer prompt", "mid length one"]
    alone = [_complete(server, prompt=p, echo=True, logprobs=1, max_tokens=0)["choices"][0]["logprobs"]
             for p in prompts]
    before = engine.stats()
    results = {}

    def ask(i):
        body = dict(prompt=prompts[i], echo=True, logprobs=1, max_tokens=0) if i < 3 else dict(prompt="x", max_tokens=2)
        results[i] = _complete(server, **body)

    engine.pause()
    try:
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while engine.stats()["waiting"] < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        engine.resume()
    for t in threads:
        t.join(120)
    after = engine.stats()
    assert after["score_calls"] - before["score_calls"] == 1
    assert after["generate_calls"] - before["generate_calls"] == 1
    for i in range(3):
        got = results[i]["choices"][0]["logprobs"]
        assert got["tokens"] == alone[i]["tokens"]
        assert got["token_logprobs"][1:] == pytest.approx(alone[i]["token_logprobs"][1:], abs=1e-5)
