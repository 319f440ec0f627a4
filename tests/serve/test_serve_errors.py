"""Bad requests get OpenAI-style JSON errors with a 4xx status; nothing ever answers with a 5xx."""

import json

import httpx
import openai
import pytest

MSG = [{"role": "user", "content": "hi"}]


_HTTP = httpx.Client(timeout=120)  # one client: building one per request costs more than the request


def _post(server, path, body, raw=False):
    content = body if raw else json.dumps(body)
    return _HTTP.post(server.url + path, content=content, headers={"Content-Type": "application/json"})


def _assert_openai_error(response, status, param="__any__"):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == "invalid_request_error"
    if param != "__any__":
        assert error["param"] == param
    return error


CHAT_CASES = [
    # (name, body, status, param)
    ("unknown model", {"model": "gpt-9", "messages": MSG}, 404, "model"),
    ("missing model", {"messages": MSG}, 400, "model"),
    ("missing messages", {"model": "tiny"}, 400, "messages"),
    ("empty messages", {"model": "tiny", "messages": []}, 400, "messages"),
    ("messages not a list", {"model": "tiny", "messages": "hi"}, 400, "messages"),
    ("message not an object", {"model": "tiny", "messages": ["hi"]}, 400, "messages[0]"),
    ("missing role", {"model": "tiny", "messages": [{"content": "hi"}]}, 400, "messages[0].role"),
    ("unknown role", {"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ("missing content", {"model": "tiny", "messages": [{"role": "user"}]}, 400, "messages[0].content"),
    ("content a number", {"model": "tiny", "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ("content null", {"model": "tiny", "messages": [{"role": "user", "content": None}]}, 400, "messages[0].content"),
    ("content parts not text", {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     400, "messages[0].content[0].type"),
    ("temperature -1", {"model": "tiny", "messages": MSG, "temperature": -1}, 400, "temperature"),
    ("temperature 2.5", {"model": "tiny", "messages": MSG, "temperature": 2.5}, 400, "temperature"),
    ("temperature a string", {"model": "tiny", "messages": MSG, "temperature": "0.5"}, 400, "temperature"),
    ("top_p 0", {"model": "tiny", "messages": MSG, "top_p": 0}, 400, "top_p"),
    ("top_p 1.5", {"model": "tiny", "messages": MSG, "top_p": 1.5}, 400, "top_p"),
    ("max_tokens 0", {"model": "tiny", "messages": MSG, "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens -5", {"model": "tiny", "messages": MSG, "max_tokens": -5}, 400, "max_tokens"),
    ("max_tokens a float", {"model": "tiny", "messages": MSG, "max_tokens": 1.5}, 400, "max_tokens"),
    ("max_tokens beyond the context", {"model": "tiny", "messages": MSG, "max_tokens": 10 ** 6}, 400, "max_tokens"),
    ("max_completion_tokens 0", {"model": "tiny", "messages": MSG, "max_completion_tokens": 0}, 400,
     "max_completion_tokens"),
    ("n 0", {"model": "tiny", "messages": MSG, "n": 0}, 400, "n"),
    ("n above the cap", {"model": "tiny", "messages": MSG, "n": 1000}, 400, "n"),
    ("n true", {"model": "tiny", "messages": MSG, "n": True}, 400, "n"),
    ("stop not strings", {"model": "tiny", "messages": MSG, "stop": ["a", 1]}, 400, "stop[1]"),
    ("too many stops", {"model": "tiny", "messages": MSG, "stop": list("abcde")}, 400, "stop"),
    ("seed a string", {"model": "tiny", "messages": MSG, "seed": "1"}, 400, "seed"),
    ("seed too large", {"model": "tiny", "messages": MSG, "seed": 2 ** 70}, 400, "seed"),
    ("stream a string", {"model": "tiny", "messages": MSG, "stream": "yes"}, 400, "stream"),
    ("top_logprobs above 20", {"model": "tiny", "messages": MSG, "logprobs": True, "top_logprobs": 21}, 400,
     "top_logprobs"),
    ("top_logprobs negative", {"model": "tiny", "messages": MSG, "logprobs": True, "top_logprobs": -1}, 400,
     "top_logprobs"),
    ("top_logprobs without logprobs", {"model": "tiny", "messages": MSG, "top_logprobs": 2}, 400, "top_logprobs"),
    ("logprobs not a bool", {"model": "tiny", "messages": MSG, "logprobs": 3}, 400, "logprobs"),
    ("logprobs while streaming", {"model": "tiny", "messages": MSG, "logprobs": True, "stream": True}, 400,
     "logprobs"),
    ("tools", {"model": "tiny", "messages": MSG, "tools": [{"type": "function"}]}, 400, "tools"),
    ("presence penalty", {"model": "tiny", "messages": MSG, "presence_penalty": 1.0}, 400, "presence_penalty"),
    ("json response format", {"model": "tiny", "messages": MSG, "response_format": {"type": "json_object"}}, 400,
     "response_format"),
]


@pytest.mark.parametrize("name,body,status,param", CHAT_CASES, ids=[c[0] for c in CHAT_CASES])
def test_chat_bad_requests(server, name, body, status, param):
    _assert_openai_error(_post(server, "/v1/chat/completions", body), status, param)


COMPLETION_CASES = [
    ("unknown model", {"model": "x", "prompt": "hi"}, 404, "model"),
    ("missing prompt", {"model": "tiny"}, 400, "prompt"),
    ("prompt a number", {"model": "tiny", "prompt": 3}, 400, "prompt"),
    ("empty prompt list", {"model": "tiny", "prompt": []}, 400, "prompt"),
    ("too many prompts", {"model": "tiny", "prompt": ["a"] * 100}, 400, "prompt"),
    ("logprobs above 20", {"model": "tiny", "prompt": "hi", "logprobs": 21}, 400, "logprobs"),
    ("logprobs negative", {"model": "tiny", "prompt": "hi", "logprobs": -1}, 400, "logprobs"),
    ("logprobs a float", {"model": "tiny", "prompt": "hi", "logprobs": 1.5}, 400, "logprobs"),
    ("echo while streaming", {"model": "tiny", "prompt": "hi", "echo": True, "stream": True}, 400, "echo"),
    ("logprobs while streaming", {"model": "tiny", "prompt": "hi", "logprobs": 1, "stream": True}, 400, "logprobs"),
    ("token id beyond the vocabulary", {"model": "tiny", "prompt": [5, 10 ** 6]}, 400, "prompt"),
    ("negative token id in a batch", {"model": "tiny", "prompt": [[5], [6, -1]]}, 400, "prompt[1]"),
    ("empty token list in a batch", {"model": "tiny", "prompt": [[5], []]}, 400, "prompt[1]"),
    ("strings and ids mixed", {"model": "tiny", "prompt": ["a", 5]}, 400, "__any__"),
    ("too many token-id prompts", {"model": "tiny", "prompt": [[5]] * 100}, 400, "prompt"),
    ("max_tokens 0 without echo", {"model": "tiny", "prompt": "hi", "max_tokens": 0, "logprobs": 1}, 400,
     "max_tokens"),
    ("scored prompt longer than the context", {"model": "tiny", "prompt": [5] * 1025, "max_tokens": 0,
                                               "echo": True}, 400, "prompt"),
    ("temperature -1", {"model": "tiny", "prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("max_tokens 0", {"model": "tiny", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("prompt longer than the context", {"model": "tiny", "prompt": "x" * 2000}, 400, "prompt"),
]


@pytest.mark.parametrize("name,body,status,param", COMPLETION_CASES, ids=[c[0] for c in COMPLETION_CASES])
def test_completion_bad_requests(server, name, body, status, param):
    _assert_openai_error(_post(server, "/v1/completions", body), status, param)


@pytest.mark.parametrize("raw", ["{not json", "", "[]", "null", "42", '"text"', '{"model": "tiny", "messages": [}'])
def test_invalid_json_bodies(server, raw):
    for path in ("/v1/chat/completions", "/v1/completions"):
        _assert_openai_error(_post(server, path, raw, raw=True), 400, None)


def test_body_is_read_as_json_whatever_the_content_type(server):
    """`curl -d '{...}'` sends a form Content-Type; the body is JSON all the same."""
    body = json.dumps({"model": "tiny", "messages": MSG, "max_tokens": 2})
    for content_type in ("application/x-www-form-urlencoded", "text/plain"):
        r = _HTTP.post(server.url + "/v1/chat/completions", content=body, headers={"Content-Type": content_type})
        assert r.status_code == 200, r.text
    r = _HTTP.post(server.url + "/v1/chat/completions", content="model=tiny",
                   headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


def test_non_finite_numbers_are_rejected(server):
    # Python's json module (and so the server) reads NaN and Infinity; they must not reach torch
    for value in ("NaN", "Infinity", "-Infinity"):
        raw = '{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": ' + f"{value}}}"
        _assert_openai_error(_post(server, "/v1/chat/completions", raw, raw=True), 400, "temperature")


def test_openai_client_raises_typed_errors(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=MSG)
    assert e.value.body["code"] == "model_not_found"
    for kw in (dict(temperature=-1), dict(top_p=0), dict(max_tokens=0), dict(n=0), dict(messages=[])):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(**{"model": "tiny", "messages": MSG, **kw})
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[{"role": "user"}])


def test_unknown_routes_and_methods_are_json(server):
    r = _HTTP.get(server.url + "/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = _HTTP.get(server.url + "/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_oversized_body_is_413(server):
    import socket

    with socket.create_connection((server.url.split("//")[1].split(":")[0], server.port), timeout=60) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000000000\r\n\r\n{}")
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            data = sock.recv(65536)
            if not data:
                break
            reply += data
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.split()[1] == b"413"
    assert json.loads(body)["error"]["code"] == "request_too_large"


WEIRD = [None, -1, 0, 1, 2.5, 10 ** 30, "x", [], [1], {"a": 1}, True]
FIELDS = ["model", "messages", "temperature", "top_p", "max_tokens", "max_completion_tokens", "n", "stop",
          "seed", "stream", "stream_options", "top_k", "min_p", "repetition_penalty", "user", "logit_bias"]


def test_no_5xx_for_any_malformed_field(server):
    """Every field of a valid request replaced by odd values: 2xx or 4xx, never 5xx."""
    from concurrent.futures import ThreadPoolExecutor

    base = {"model": "tiny", "messages": MSG, "max_tokens": 1}
    cases = [("/v1/chat/completions", {**base, field: value}) for field in FIELDS for value in WEIRD]
    cases += [("/v1/completions", {"model": "tiny", "prompt": value, "max_tokens": 1}) for value in WEIRD]
    cases += [("/v1/chat/completions", {**base, "messages": [{"role": "user", "content": value}]}) for value in WEIRD]
    cases += [("/v1/chat/completions", {**base, "messages": [value]}) for value in WEIRD]
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda case: _post(server, *case), cases))
    for (path, body), r in zip(cases, responses):
        assert r.status_code < 500, (path, body, r.text)
        if r.status_code >= 400:
            _assert_openai_error(r, r.status_code)
    assert {200, 400} <= {r.status_code for r in responses}


def test_untrusted_model_text_is_json_encoded(client):
    """The tiny model emits control bytes and invalid UTF-8: the answer is still valid JSON/SSE."""
    r = client.completions.create(model="tiny", prompt="\x00<script>", temperature=1.5, seed=2, max_tokens=24)
    assert isinstance(r.choices[0].text, str)
    stream = client.completions.create(model="tiny", prompt="\x00<script>", temperature=1.5, seed=2, max_tokens=24,
                                       stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == r.choices[0].text
