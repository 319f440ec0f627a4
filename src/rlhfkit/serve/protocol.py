"""The OpenAI wire format: request schemas, their checks, errors and response bodies.

Requests are parsed by pydantic in strict mode (``"1"`` is not a number, ``true`` is not an
integer); unknown fields are ignored, as other OpenAI-compatible servers do, except the ones
that ask for something this server cannot do (``logprobs``, ``tools``, penalties, ...), which are
refused with a 400 rather than silently dropped. Every problem becomes :class:`APIError`, whose
body is OpenAI's ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from rlhfkit.generation.decoding import Completion, SamplingParams

MAX_STOP = 4            # OpenAI's limit on stop sequences
MAX_PROMPTS = 32        # prompts in one /v1/completions request
SEED_RANGE = (-(2 ** 63), 2 ** 63 - 1)


class APIError(Exception):
    """An error answered as OpenAI's JSON error object with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# ------------------------------------------------------------------------------ schemas
class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool | None = None


class _SamplingRequest(_Strict):
    model: str
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict | None = None
    user: str | None = None
    # rlhfkit extensions (vLLM spells them the same way)
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None


class ChatCompletionRequest(_SamplingRequest):
    messages: list[Message]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list | None = None
    tool_choice: Any = None
    functions: list | None = None
    function_call: Any = None
    response_format: dict | None = None


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str]
    echo: bool | None = None
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None


# ------------------------------------------------------------------------------ checks
def _unsupported(param: str, why: str = "") -> APIError:
    return APIError(400, f"'{param}' is not supported by this server{why}", param, "unsupported_parameter")


def check_unsupported(req: _SamplingRequest) -> None:
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(req, name)
        if value is not None and value != 0:
            raise _unsupported(name, " (use the 'repetition_penalty' extension instead)")
    if req.logit_bias:
        raise _unsupported("logit_bias")
    if isinstance(req, ChatCompletionRequest):
        if req.logprobs or req.top_logprobs:
            raise _unsupported("logprobs" if req.logprobs else "top_logprobs")
        for name in ("tools", "functions"):
            if getattr(req, name):
                raise _unsupported(name)
        for name in ("tool_choice", "function_call"):
            if getattr(req, name) not in (None, "none"):
                raise _unsupported(name)
        if req.response_format and req.response_format.get("type", "text") != "text":
            raise _unsupported("response_format", " (only {\"type\": \"text\"})")
    else:
        if req.echo:
            raise _unsupported("echo")
        if req.logprobs is not None:
            raise _unsupported("logprobs")
        if req.suffix:
            raise _unsupported("suffix")
        if req.best_of is not None and req.best_of not in (1, req.n or 1):
            raise _unsupported("best_of", " (other than equal to n)")


def chat_messages(req: ChatCompletionRequest) -> list[dict]:
    """Messages as plain ``{"role", "content"}`` dicts (text parts joined, developer -> system)."""
    if not req.messages:
        raise APIError(400, "'messages' must contain at least one message", "messages", "invalid_value")
    out = []
    for m in req.messages:
        content = m.content if isinstance(m.content, str) else "\n".join(p.text for p in m.content)
        out.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    return out


def _number(name: str, value, default, ok, expected: str):
    if value is None:
        return default
    if not (isinstance(value, (int, float)) and math.isfinite(value) and ok(value)):
        raise APIError(400, f"'{name}' must be {expected} (got {value!r})", name, "invalid_value")
    return value


def sampling_params(req: _SamplingRequest, prompt_lengths: list[int], context_length: int | None,
                    default_max_tokens: int, max_n: int) -> SamplingParams:
    """The request's sampling parameters, range-checked against OpenAI's limits and the context."""
    temperature = _number("temperature", req.temperature, 1.0, lambda v: 0 <= v <= 2, "between 0 and 2")
    top_p = _number("top_p", req.top_p, 1.0, lambda v: 0 < v <= 1, "in (0, 1]")
    n = _number("n", req.n, 1, lambda v: 1 <= v <= max_n, f"between 1 and {max_n}")
    top_k = _number("top_k", req.top_k, 0, lambda v: v >= 0, ">= 0 (0 disables)")
    min_p = _number("min_p", req.min_p, 0.0, lambda v: 0 <= v < 1, "in [0, 1)")
    repetition_penalty = _number("repetition_penalty", req.repetition_penalty, 1.0, lambda v: 0 < v <= 10,
                                 "in (0, 10]")
    seed = _number("seed", req.seed, None, lambda v: SEED_RANGE[0] <= v <= SEED_RANGE[1], "a 64-bit integer")

    name = "max_tokens"
    max_tokens = req.max_tokens
    if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None:
        name, max_tokens = "max_completion_tokens", req.max_completion_tokens
    longest = max(prompt_lengths)
    room = None if context_length is None else context_length - longest
    prompt_param = "messages" if isinstance(req, ChatCompletionRequest) else "prompt"
    if room is not None and room < 1:
        raise APIError(400, f"this model's maximum context length is {context_length} tokens; the prompt "
                            f"has {longest} tokens, which leaves no room for a completion",
                       prompt_param, "context_length_exceeded")
    if max_tokens is None:
        max_tokens = default_max_tokens if room is None else min(default_max_tokens, room)
    elif max_tokens < 1:
        raise APIError(400, f"'{name}' must be >= 1 (got {max_tokens})", name, "invalid_value")
    elif room is not None and max_tokens > room:
        raise APIError(400, f"this model's maximum context length is {context_length} tokens; the prompt "
                            f"has {longest} tokens and {max_tokens} were requested for the completion "
                            f"(at most {room})", name, "context_length_exceeded")

    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > MAX_STOP:
        raise APIError(400, f"'stop' may hold at most {MAX_STOP} sequences (got {len(stop)})", "stop",
                       "invalid_value")
    stop = [s for s in stop if s]

    if temperature == 0:
        params = SamplingParams(strategy="greedy", max_new_tokens=max_tokens, n=n, stop=stop,
                                repetition_penalty=repetition_penalty)
    else:
        params = SamplingParams(strategy="sample", max_new_tokens=max_tokens, temperature=float(temperature),
                                top_p=float(top_p), top_k=top_k, min_p=float(min_p),
                                repetition_penalty=float(repetition_penalty), n=n, stop=stop, seed=seed)
    problems = params.problems()
    if problems:  # cannot happen after the checks above; kept as a guard
        raise APIError(400, "; ".join(problems), None, "invalid_value")
    return params


# ------------------------------------------------------------------------------ responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completions: list[Completion]) -> dict:
    completion_tokens = sum(c.num_tokens for c in completions)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_response(rid: str, created: int, model: str, completions: list[Completion], prompt_tokens: int) -> dict:
    return {
        "id": rid, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": i, "message": {"role": "assistant", "content": c.text},
                     "finish_reason": c.finish_reason, "logprobs": None}
                    for i, c in enumerate(completions)],
        "usage": usage(prompt_tokens, completions),
    }


def completion_response(rid: str, created: int, model: str, completions: list[Completion],
                        prompt_tokens: int) -> dict:
    return {
        "id": rid, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": i, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None}
                    for i, c in enumerate(completions)],
        "usage": usage(prompt_tokens, completions),
    }


def chat_chunk(rid: str, created: int, model: str, index: int, delta: dict,
               finish_reason: str | None = None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}


def completion_chunk(rid: str, created: int, model: str, index: int, text: str,
                     finish_reason: str | None = None) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "finish_reason": finish_reason, "logprobs": None}]}


def usage_chunk(rid: str, created: int, model: str, obj: str, prompt_tokens: int,
                completions: list[Completion]) -> dict:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [],
            "usage": usage(prompt_tokens, completions)}
