"""The OpenAI wire format: request schemas, their checks, errors and response bodies.

Requests are parsed by pydantic in strict mode (``"1"`` is not a number, ``true`` is not an
integer); unknown fields are ignored, as other OpenAI-compatible servers do, except the ones
that ask for something this server cannot do (``tools``, penalties, ``suffix``, log-probs while
streaming, ...), which are refused with a 400 rather than silently dropped. Every problem becomes
:class:`APIError`, whose body is OpenAI's ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from rlhfkit.generation.decoding import Completion, SamplingParams
from rlhfkit.models.token_scores import TokenScores
from rlhfkit.serve.engine import LogprobsRequest

MAX_STOP = 4            # OpenAI's limit on stop sequences (chat)
MAX_STOP_COMPLETIONS = 16  # /v1/completions: lm-eval sends a task's `until` strings plus EOS, untruncated
MAX_PROMPTS = 32        # prompts in one /v1/completions request
MAX_LOGPROBS = 20       # most alternatives per token (OpenAI's chat limit; vLLM's default max_logprobs)
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
    prompt: str | list[str] | list[int] | list[list[int]]   # text, texts, token ids, or a batch of token ids
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
        for name in ("tools", "functions"):
            if getattr(req, name):
                raise _unsupported(name)
        for name in ("tool_choice", "function_call"):
            if getattr(req, name) not in (None, "none"):
                raise _unsupported(name)
        if req.response_format and req.response_format.get("type", "text") != "text":
            raise _unsupported("response_format", " (only {\"type\": \"text\"})")
        if req.logprobs and req.stream:
            raise _unsupported("logprobs", " with 'stream' (ask without streaming)")
    else:
        if req.stream:
            for name in ("echo", "logprobs"):
                if getattr(req, name) not in (None, False):
                    raise _unsupported(name, " with 'stream' (ask without streaming)")
        if req.suffix:
            raise _unsupported("suffix")
        if req.best_of is not None and req.best_of not in (1, req.n or 1):
            raise _unsupported("best_of", " (other than equal to n)")


def logprobs_request(req: _SamplingRequest) -> LogprobsRequest | None:
    """What log-probs the request asks for (None: none). Chat: ``logprobs: true`` with
    ``top_logprobs`` alternatives; completions: ``logprobs`` alternatives (0: the chosen token only)."""
    if isinstance(req, ChatCompletionRequest):
        if req.top_logprobs not in (None, 0) and not req.logprobs:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs", "invalid_value")
        if not req.logprobs:
            return None
        top = _number("top_logprobs", req.top_logprobs, 0, lambda v: 0 <= v <= MAX_LOGPROBS,
                      f"an integer between 0 and {MAX_LOGPROBS}")
        return LogprobsRequest(top, echo=False)
    if req.logprobs is None:
        return None
    top = _number("logprobs", req.logprobs, 0, lambda v: 0 <= v <= MAX_LOGPROBS,
                  f"an integer between 0 and {MAX_LOGPROBS}")
    return LogprobsRequest(top, echo=bool(req.echo))


def completion_prompts(req: CompletionRequest, vocab_size: int) -> tuple[list[str] | None, list[list[int]] | None]:
    """``(texts, None)`` for text prompts, ``(None, token_ids)`` for token-id prompts (checked
    against the vocabulary: ids in ``[0, vocab_size)``)."""
    prompt = req.prompt
    if isinstance(prompt, str):
        return [prompt], None
    if prompt and isinstance(prompt[0], int):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "'prompt' must be a string, a non-empty list of strings, a non-empty list of token "
                            "ids or a non-empty list of token-id lists", "prompt", "invalid_value")
    if len(prompt) > MAX_PROMPTS:
        raise APIError(400, f"at most {MAX_PROMPTS} prompts per request (got {len(prompt)})", "prompt",
                       "invalid_value")
    if isinstance(prompt[0], str):
        return list(prompt), None
    for i, ids in enumerate(prompt):
        param = "prompt" if req.prompt is not prompt else f"prompt[{i}]"
        if not ids:
            raise APIError(400, f"'{param}' must hold at least one token id", param, "invalid_value")
        bad = next((t for t in ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise APIError(400, f"'{param}' holds the token id {bad}, outside this model's vocabulary "
                                f"[0, {vocab_size})", param, "invalid_value")
    return None, [list(ids) for ids in prompt]


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


def _max_tokens(req: _SamplingRequest, longest: int, context_length: int | None, default: int) -> int:
    """Tokens to generate: the request's, checked against the room the longest prompt leaves in the
    context, or the default capped by that room. 0 only for a completions request with ``echo``
    (score the prompt, generate nothing), which needs no room."""
    name = "max_tokens"
    max_tokens = req.max_tokens
    if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None:
        name, max_tokens = "max_completion_tokens", req.max_completion_tokens
    scoring = max_tokens == 0 and isinstance(req, CompletionRequest) and bool(req.echo)
    room = None if context_length is None else context_length - longest
    prompt_param = "messages" if isinstance(req, ChatCompletionRequest) else "prompt"
    if room is not None and room < (0 if scoring else 1):
        raise APIError(400, f"this model's maximum context length is {context_length} tokens; the prompt "
                            f"has {longest} tokens, which leaves no room for a completion",
                       prompt_param, "context_length_exceeded")
    if max_tokens is None:
        return default if room is None else min(default, room)
    if max_tokens < 1 and not scoring:
        extra = " (0 is allowed with 'echo', to score the prompt)" if isinstance(req, CompletionRequest) else ""
        raise APIError(400, f"'{name}' must be >= 1 (got {max_tokens}){extra}", name, "invalid_value")
    if room is not None and max_tokens > room:
        raise APIError(400, f"this model's maximum context length is {context_length} tokens; the prompt "
                            f"has {longest} tokens and {max_tokens} were requested for the completion "
                            f"(at most {room})", name, "context_length_exceeded")
    return max_tokens


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

    max_tokens = _max_tokens(req, max(prompt_lengths), context_length, default_max_tokens)
    if max_tokens == 0:  # scoring the prompt (echo): nothing is generated; the params are not used
        max_tokens = 1
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    max_stop = MAX_STOP if isinstance(req, ChatCompletionRequest) else MAX_STOP_COMPLETIONS
    if len(stop) > max_stop:
        raise APIError(400, f"'stop' may hold at most {max_stop} sequences (got {len(stop)})", "stop",
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


def chat_response(rid: str, created: int, model: str, completions: list[Completion], prompt_tokens: int,
                  logprobs: list[dict] | None = None) -> dict:
    return {
        "id": rid, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": i, "message": {"role": "assistant", "content": c.text},
                     "finish_reason": c.finish_reason, "logprobs": None if logprobs is None else logprobs[i]}
                    for i, c in enumerate(completions)],
        "usage": usage(prompt_tokens, completions),
    }


def completion_response(rid: str, created: int, model: str, completions: list[Completion],
                        prompt_tokens: int, echoed: list[str] | None = None,
                        logprobs: list[dict] | None = None) -> dict:
    """``echoed``: per choice, the prompt text put before the completion (``echo``)."""
    return {
        "id": rid, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": i, "text": (echoed[i] if echoed else "") + c.text, "finish_reason": c.finish_reason,
                     "logprobs": None if logprobs is None else logprobs[i]}
                    for i, c in enumerate(completions)],
        "usage": usage(prompt_tokens, completions),
    }


def completion_logprobs(prompt: list[int], scores: TokenScores, echo: bool, top: int, token_text,
                        offset: int) -> dict:
    """OpenAI's legacy ``logprobs`` object of one choice: ``tokens``, ``token_logprobs``,
    ``top_logprobs`` (the ``top`` most likely tokens and the chosen one, token text -> log-prob) and
    ``text_offset`` (each token's character offset in prompt + completion text, summed from the token
    texts, starting at ``offset``). With ``echo`` the prompt's tokens come first; its first token has
    no log-prob (null), as nothing predicts it. ``token_text(id)`` gives a token's text."""
    ids, logps = list(scores.token_ids), list(scores.logps)
    tops: list[dict | None] = [_top_dict(alts[:top], t, lp, token_text)
                               for t, lp, alts in zip(ids, logps, scores.top)]
    if echo:
        ids, logps, tops = [prompt[0]] + ids, [None] + logps, [None] + tops
    tokens = [token_text(t) for t in ids]
    offsets, at = [], offset
    for text in tokens:
        offsets.append(at)
        at += len(text)
    return {"tokens": tokens, "token_logprobs": logps, "top_logprobs": tops, "text_offset": offsets}


def _top_dict(alternatives: list[tuple[int, float]], chosen: int, logp: float, token_text) -> dict[str, float]:
    out: dict[str, float] = {}
    for token, value in [*alternatives, (chosen, logp)]:
        out.setdefault(token_text(token), value)  # best first: a text two ids share keeps the higher
    return out


def chat_logprobs(scores: TokenScores, top: int, token_text) -> dict:
    """OpenAI's chat ``logprobs`` object of one choice: ``content``, one entry per generated token
    (``token``, ``logprob``, ``bytes``: the UTF-8 bytes of its text, and ``top_logprobs``: the ``top``
    most likely tokens there, best first)."""
    def entry(token: int, logp: float) -> dict:
        text = token_text(token)
        return {"token": text, "logprob": logp, "bytes": list(text.encode("utf-8"))}

    content = [{**entry(t, lp), "top_logprobs": [entry(a, alp) for a, alp in alts[:top]]}
               for t, lp, alts in zip(scores.token_ids, scores.logps, scores.top)]
    return {"content": content, "refusal": None}


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
