"""Models behind one interface: replies with log-probs, the journal that makes runs resumable, the options."""

from __future__ import annotations

import math
import threading
import time

import pytest

from rlhfkit.models.backends import (
    BackendError,
    JudgeOptions,
    LocalBackend,
    ModelOptions,
    OpenAIChatBackend,
    Reply,
    ReplyJournal,
    TokenLogprob,
    journaled_replies,
    make_backend,
    replies,
    request_key,
)
from scripted_endpoint import ScriptedEndpoint


def _echo(body):
    return "re: " + body["messages"][-1]["content"]


def _logprobs(body, text):
    return [{"token": w, "logprob": -0.5, "top_logprobs": [{"token": w, "logprob": -0.5},
                                                            {"token": "x", "logprob": -1.5}]}
            for w in text.split()[: body.get("top_logprobs", 1)]]


def chats(n):
    return [[{"role": "user", "content": f"q{i}"}] for i in range(n)]


def test_endpoint_replies_keep_order_and_report_each_as_it_arrives():
    with ScriptedEndpoint(_echo) as ep:
        backend = OpenAIChatBackend(ep.url, "m", concurrency=4)
        seen = []
        out = backend.reply(chats(6), on_reply=lambda i, r: seen.append((i, r.text)))
    assert [r.text for r in out] == [f"re: q{i}" for i in range(6)]
    assert sorted(seen) == [(i, f"re: q{i}") for i in range(6)]
    assert all(r.logprobs is None for r in out)


def test_endpoint_logprobs_are_parsed():
    with ScriptedEndpoint(_echo, token_logprobs=_logprobs) as ep:
        out = OpenAIChatBackend(ep.url, "m").reply(chats(1), top_logprobs=2)
        assert ep.seen[0]["logprobs"] is True and ep.seen[0]["top_logprobs"] == 2
    assert out[0].logprobs == (TokenLogprob("re:", -0.5, {"re:": -0.5, "x": -1.5}),
                               TokenLogprob("q0", -0.5, {"q0": -0.5, "x": -1.5}))


def test_an_endpoint_refusing_logprobs_is_asked_again_without_them():
    def refuse(body):
        if "logprobs" in body:
            return 400, {"error": {"message": "logprobs is not supported"}}
        return "plain"

    with ScriptedEndpoint(refuse) as ep:
        backend = OpenAIChatBackend(ep.url, "m", concurrency=1)
        out = backend.reply(chats(2), top_logprobs=5)
        assert [("logprobs" in b) for b in ep.seen] == [True, False, False]  # asked for them once only
    assert [r.text for r in out] == ["plain", "plain"] and out[0].logprobs is None


def test_an_unauthorised_endpoint_is_one_clear_error_naming_it_and_the_key_variable():
    with ScriptedEndpoint(lambda body: (401, {"error": {"message": "bad key"}})) as ep:
        backend = OpenAIChatBackend(ep.url, "m", key_env="MY_KEY", role="labeller")
        with pytest.raises(BackendError) as e:
            backend.reply(chats(1))
    message = str(e.value)
    assert "labeller endpoint http://127.0.0.1:" in message and "HTTP 401: bad key" in message
    assert "MY_KEY" in message


def test_the_api_key_is_sent_as_a_bearer_token_from_the_environment(monkeypatch):
    monkeypatch.setenv("RLHFKIT_TEST_KEY", "sk-secret")
    with ScriptedEndpoint(_echo) as ep:
        backend = make_backend("unused", ep.url, "m", "RLHFKIT_TEST_KEY", role="model")
        backend.complete(chats(1))
        assert ep.headers[0]["Authorization"] == "Bearer sk-secret"


def test_the_journal_resumes_without_resending_and_drops_a_torn_last_line(tmp_path):
    path = tmp_path / "requests.jsonl"
    keys = [request_key("m", c) for c in chats(4)]
    with ScriptedEndpoint(_echo) as ep:
        backend = OpenAIChatBackend(ep.url, "m", concurrency=2)
        first = journaled_replies(backend, chats(2), keys[:2], ReplyJournal(path))
        assert len(ep.seen) == 2
        with open(path, "a") as f:
            f.write('{"key": "torn", "te')  # a crash in the middle of a write
        journal = ReplyJournal(path)
        assert len(journal) == 2 and path.read_text().count("\n") == 2
        again = journaled_replies(backend, chats(4), keys, journal)
        assert len(ep.seen) == 4  # only the two new requests were sent
    assert [r.text for r in again] == [f"re: q{i}" for i in range(4)]
    assert again[:2] == first


def test_a_failure_keeps_the_replies_received_before_it(tmp_path):
    def fail_on_q2(body):
        return (500, {"error": {"message": "boom"}}) if body["messages"][-1]["content"] == "q2" else _echo(body)

    path = tmp_path / "requests.jsonl"
    keys = [request_key(c) for c in chats(4)]
    with ScriptedEndpoint(fail_on_q2) as ep:
        backend = OpenAIChatBackend(ep.url, "m", concurrency=1, retries=1, retry_wait=0.0)
        with pytest.raises(BackendError, match="HTTP 500: boom"):
            journaled_replies(backend, chats(4), keys, ReplyJournal(path))
    assert sorted(ReplyJournal(path)._done) == sorted(keys[:2])


def test_replies_in_flight_when_another_request_fails_are_still_recorded(tmp_path):
    """With requests in flight, one that fails must not lose the others' replies: the journal
    records them, and a resumed run does not send them again."""
    q1_sent = threading.Event()

    def respond(body):
        if body["messages"][-1]["content"] == "q0":
            q1_sent.wait(10)  # fail only once q1 is on its way
            return 401, {"error": {"message": "bad key"}}
        q1_sent.set()
        time.sleep(0.3)  # still in flight when q0's failure reaches the caller
        return _echo(body)

    path = tmp_path / "requests.jsonl"
    keys = [request_key(c) for c in chats(2)]
    with ScriptedEndpoint(respond) as ep:
        backend = OpenAIChatBackend(ep.url, "m", concurrency=2, retries=0)
        with pytest.raises(BackendError, match="HTTP 401: bad key"):
            journaled_replies(backend, chats(2), keys, ReplyJournal(path))
    journal = ReplyJournal(path)
    assert sorted(journal._done) == [keys[1]] and journal.get(keys[1]).text == "re: q1"


def test_a_plain_complete_object_serves_through_replies():
    class Canned:
        name = "canned"

        def complete(self, conversations, temperature=0.0, max_tokens=512):
            return ["ok"] * len(conversations)

    got = []
    assert replies(Canned(), chats(2), on_reply=lambda i, r: got.append(i)) == [Reply("ok"), Reply("ok")]
    assert got == [0, 1]


def test_local_top_logprobs_are_the_models_own(tiny_lm):
    backend = LocalBackend(tiny_lm, batch_size=2)
    out = backend.reply(chats(2), max_tokens=4, top_logprobs=3)
    assert len(out) == 2
    for reply in out:
        assert reply.logprobs is not None and 1 <= len(reply.logprobs) <= 4
        for t in reply.logprobs:
            assert 1 <= len(t.top) <= 3 and max(t.top.values()) == pytest.approx(t.logprob, abs=1e-4)  # greedy: the top
            assert sum(math.exp(v) for v in t.top.values()) <= 1 + 1e-5


def test_options_are_validated():
    assert ModelOptions(model_url="http://x/v1").model_problems() == [
        "--model-url needs --model-name (the model to request from it)"]
    assert ModelOptions(model="", model_url="").model_problems() == ["--model or --model-url is required"]
    assert ModelOptions().model_problems() == []
    assert JudgeOptions(judge_model="", judge_url="http://x").judge_problems() == [
        "--judge-url needs --judge-model (the model to request from it)"]


def test_local_sampling_draws_a_different_stream_per_request_and_the_same_for_the_same_request(tiny_lm):
    backend = LocalBackend(tiny_lm, batch_size=1, seed=3)
    prompts = [[{"role": "user", "content": "same words"}], [{"role": "user", "content": "other words"}]]
    first = backend.complete(prompts * 2, temperature=1.0, max_tokens=12)
    assert first[0] == first[2] and first[1] == first[3]  # same request, same reply
    again = backend.complete([prompts[1], prompts[0]], temperature=1.0, max_tokens=12)
    assert again == [first[1], first[0]]  # whatever its position in the call
    assert first[0] != first[1]


def test_a_request_given_twice_in_one_call_is_sent_once(tmp_path):
    conversations = chats(2) + chats(2)
    keys = [request_key(c) for c in conversations]
    with ScriptedEndpoint(_echo) as ep:
        out = journaled_replies(OpenAIChatBackend(ep.url, "m"), conversations, keys,
                                ReplyJournal(tmp_path / "j.jsonl"))
        assert len(ep.seen) == 2
    assert [r.text for r in out] == ["re: q0", "re: q1", "re: q0", "re: q1"]
