"""The batching engine and the decoding helpers it uses, without HTTP."""

import queue

import pytest

from rlhfkit.data.chat import encode_prompt
from rlhfkit.generation.decoding import SamplingParams, describe_response, generate_chat, generate_completions
from rlhfkit.serve.engine import Engine, EngineClosed, Job, stream_safe_text


@pytest.mark.parametrize("text,stop,strip,expected", [
    ("Hello wor", ["world"], False, "Hello "),      # could be the start of a stop string: held
    ("Hello wor", ["xyz"], False, "Hello wor"),
    ("ab", ["abc"], False, ""),
    ("abc\ufffd", [], False, "abc"),                # an incomplete UTF-8 sequence: held
    ("  hi  ", [], True, "hi"),                     # will be stripped: trailing spaces held
    ("  hi  ", [], False, "  hi  "),
    ("x END", ["END", "E!"], False, "x "),
])
def test_stream_safe_text(text, stop, strip, expected):
    assert stream_safe_text(text, stop, strip) == expected


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_describe_response_finish_reasons_and_counts(policy):
    _, tok = policy
    hello = _ids(tok, " hello world ")  # byte-level, one token per character
    eos = tok.eos_token_id
    done = describe_response(tok, hello + [eos], max_new_tokens=50)
    assert (done.text, done.finish_reason, done.num_tokens) == ("hello world", "stop", len(hello) + 1)
    assert describe_response(tok, hello, max_new_tokens=len(hello)).finish_reason == "length"
    assert describe_response(tok, hello, max_new_tokens=len(hello) + 5).finish_reason == "stop"  # ended early
    raw = describe_response(tok, hello, max_new_tokens=len(hello), strip=False)
    assert raw.text == " hello world " and raw.finish_reason == "length"
    # a stop string: the text is cut before it, the tokens after the one that completed it
    cut = describe_response(tok, hello, max_new_tokens=len(hello), stop=["o w"], strip=False)
    assert (cut.text, cut.finish_reason) == (" hell", "stop")
    assert tok.decode(cut.token_ids) == " hello w"


def test_generate_completions_matches_generate_chat(policy):
    model, tok = policy
    params = SamplingParams(strategy="sample", temperature=0.9, seed=4, n=2, max_new_tokens=10)
    prompts = ["one", [{"role": "user", "content": "two"}]]
    texts = generate_chat(model, tok, prompts, params)
    completions = generate_completions(model, tok, prompts, params)
    assert [[c.text for c in row] for row in completions] == texts
    for row in completions:
        for c in row:
            assert 1 <= c.num_tokens <= 10
            assert c.finish_reason == ("length" if c.num_tokens == 10 and c.token_ids[-1] != tok.eos_token_id
                                       else "stop")


@pytest.fixture
def engine(policy):
    model, tok = policy
    e = Engine(model, tok, max_batch_size=4, batch_wait_ms=1)
    yield e
    e.stop()


def _job(tok, text="hi", **params):
    q = queue.Queue()
    params.setdefault("max_new_tokens", 8)
    params.setdefault("strategy", "greedy")
    return Job([encode_prompt(tok, text)], SamplingParams(**params), sink=q.put), q


def _result(q):
    while True:
        event = q.get(timeout=120)
        if event[0] in ("done", "error"):
            return event


def test_engine_answers_and_counts(engine, policy):
    _, tok = policy
    job, q = _job(tok)
    engine.submit(job)
    kind, completions = _result(q)
    assert kind == "done" and len(completions) == 1 and completions[0].num_tokens <= 8
    stats = engine.stats()
    assert stats["generate_calls"] == 1 and stats["requests"] == 1 and stats["waiting"] == 0


def test_cancelled_stream_stops_its_rows(engine, policy):
    _, tok = policy
    events = []

    def sink(event):
        events.append(event)
        if sum(e[0] == "delta" for e in events) == 3:
            job.cancelled = True  # what the HTTP layer does when the client disconnects

    job = Job([encode_prompt(tok, "tell me a long story")],
              SamplingParams(strategy="sample", temperature=1.0, max_new_tokens=500), sink=sink, stream=True,
              strip=False)
    follow, q = _job(tok)
    engine.submit(job)
    engine.submit(follow)
    assert _result(q)[0] == "done"  # the engine carried on
    assert [e[0] for e in events] == ["delta"] * 3  # nothing after the cancellation, no "done"


def test_generation_failure_is_an_error_event_and_the_worker_survives(engine, policy, monkeypatch):
    model, tok = policy

    def boom(*args, **kwargs):
        raise RuntimeError("simulated device failure")

    monkeypatch.setattr(model, "forward", boom)  # decoding calls the forward
    job, q = _job(tok)
    engine.submit(job)
    event = _result(q)
    assert event[0] == "error" and event[1] == 500 and "simulated device failure" in event[2]
    assert event[3] == "server_error"
    monkeypatch.undo()
    job, q = _job(tok)
    engine.submit(job)
    assert _result(q)[0] == "done"
    assert engine.stats()["failed_calls"] == 1


def test_stop_answers_waiting_jobs_and_refuses_new_ones(policy):
    model, tok = policy
    engine = Engine(model, tok, batch_wait_ms=0)
    engine.pause()
    job, q = _job(tok)
    engine.submit(job)
    engine.stop()
    event = _result(q)
    assert event[0] == "error" and event[1] == 503
    with pytest.raises(EngineClosed):
        engine.submit(_job(tok)[0])
    assert not engine.alive


def test_per_row_limits_in_one_call(policy):
    """Jobs with different max_tokens and stop strings share a call; each keeps its own limits."""
    model, tok = policy
    engine = Engine(model, tok, max_batch_size=8, batch_wait_ms=0)
    try:
        engine.pause()
        queues = []
        for max_new in (2, 5, 9):
            job, q = _job(tok, text="same prompt", max_new_tokens=max_new)
            engine.submit(job)
            queues.append(q)
        engine.resume()
        results = [_result(q)[1][0] for q in queues]
        assert engine.stats()["generate_calls"] == 1
        for r, max_new in zip(results, (2, 5, 9)):
            assert r.num_tokens == max_new if r.finish_reason == "length" else r.num_tokens < max_new
        # greedy prefixes agree: the shorter answers are prefixes of the longer one
        assert results[2].text.startswith(results[0].text.strip()) and results[2].text.startswith(
            results[1].text.strip())
    finally:
        engine.stop()


def test_a_failing_request_does_not_take_its_batch_down(policy, monkeypatch):
    """When a shared call fails, its jobs run again alone: only the one at fault gets the error."""
    model, tok = policy
    poison = _ids(tok, "~")[0]
    real_forward = model.forward

    def picky(*args, **kwargs):  # the prompt's forward (the prefill) fails on the poison token
        if kwargs["input_ids"].shape[1] > 1 and (kwargs["input_ids"] == poison).any():
            raise ValueError("cannot digest '~'")
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", picky)
    engine = Engine(model, tok, max_batch_size=8, batch_wait_ms=0)
    try:
        engine.pause()
        good, good_q = _job(tok, text="fine")
        bad, bad_q = _job(tok, text="~~~")
        engine.submit(good)
        engine.submit(bad)
        engine.resume()
        assert _result(good_q)[0] == "done"
        event = _result(bad_q)
        assert event[0] == "error" and event[1] == 500 and "cannot digest" in event[2]
        stats = engine.stats()
        assert stats["generate_calls"] == 3 and stats["failed_calls"] == 2 and stats["requests"] == 2
    finally:
        engine.stop()
