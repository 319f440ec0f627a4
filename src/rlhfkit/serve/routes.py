"""The routes of ``rlhfkit serve``, as three routers that :func:`rlhfkit.serve.server.create_app` includes.

``models_router``: ``GET /health``, ``GET /stats``, ``GET /v1/models``, ``GET /v1/models/{id}``;
``chat_router``: ``POST /v1/chat/completions``; ``completions_router``: ``POST /v1/completions``.

What every route shares (the engine, the served id, the limits) is one :class:`ServeState` on
``app.state.serve``, handed to the routes by the :func:`serve_state` dependency. Errors are raised
as :class:`rlhfkit.serve.protocol.APIError`; the app's handlers turn them into OpenAI's JSON.
"""

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from rlhfkit.serve import protocol as P
from rlhfkit.serve.engine import EngineClosed, Job


@dataclass(frozen=True)
class ServeState:
    """What the routes share: the engine, the id clients send, and the request limits."""

    engine: Any                 # rlhfkit.serve.engine.Engine (or anything with its interface)
    served_model_name: str
    created_at: int             # the models' "created" time: when the app was built
    max_n: int
    default_max_tokens: int
    feedback: Any = None        # rlhfkit.serve.feedback.FeedbackStore: log chat completions (--feedback-db)

    def model_card(self) -> dict:
        return {"id": self.served_model_name, "object": "model", "created": self.created_at,
                "owned_by": "rlhfkit", "max_model_len": self.engine.context_length}

    def check_model(self, name: str) -> None:
        """Refuse a request for another model than the one served (404, as OpenAI answers)."""
        if name != self.served_model_name:
            raise P.APIError(404, f"the model '{name}' does not exist; this server serves "
                                  f"'{self.served_model_name}'", "model", "model_not_found")


async def serve_state(request: Request) -> ServeState:
    """The dependency that hands a route its app's :class:`ServeState` (async: no thread hop)."""
    return request.app.state.serve


# ------------------------------------------------------------------------------ models, health
models_router = APIRouter()


@models_router.get("/health")
async def health(state: ServeState = Depends(serve_state)):
    return {"status": "ok" if state.engine.alive else "stopped"}


@models_router.get("/stats")
async def stats(state: ServeState = Depends(serve_state)):
    return state.engine.stats()


@models_router.get("/v1/models")
async def list_models(state: ServeState = Depends(serve_state)):
    return {"object": "list", "data": [state.model_card()]}


@models_router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, state: ServeState = Depends(serve_state)):
    state.check_model(model_id)
    return state.model_card()


# ------------------------------------------------------------------------------ shared by both completions
def _encode_chat(engine, messages: list[dict]) -> list[int]:
    from rlhfkit.data.chat import encode_prompt

    with engine.tokenizer_lock:
        return encode_prompt(engine.tokenizer, messages)


def _encode_raw(engine, prompts: list[str]) -> list[list[int]]:
    from rlhfkit.data.chat import raw_text_ids

    tok = engine.tokenizer
    out = []
    with engine.tokenizer_lock:
        for text in prompts:
            ids = raw_text_ids(tok, text)
            if not ids:  # an empty prompt starts from the document boundary
                start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
                if start is None:
                    raise P.APIError(400, "'prompt' must not be empty", "prompt", "invalid_value")
                ids = [start]
            out.append(ids)
    return out


def _vocab_size(engine) -> int:
    """Token ids a prompt may hold: those both the tokenizer and the model's embeddings know."""
    size = len(engine.tokenizer)
    model_size = getattr(getattr(engine.model, "config", None), "vocab_size", None)
    return min(size, model_size) if isinstance(model_size, int) and model_size > 0 else size


def _token_texts(engine, jobs_ids) -> dict[int, str]:
    """The text of every token id in ``jobs_ids`` (special tokens as written)."""
    with engine.tokenizer_lock:
        return {t: engine.tokenizer.decode([t], skip_special_tokens=False) for t in set(jobs_ids)}


def _scored_ids(job) -> list[int]:
    ids = [p[0] for p in job.prompts]
    for s in job.scores:
        ids += s.token_ids + [a for alts in s.top for a, _ in alts]
    return ids


async def _submit(state: ServeState, req, prompts: list[list[int]], strip: bool, generate: bool = True):
    """Hand the request to the engine; returns the job and the queue its events arrive on."""
    params = P.sampling_params(req, [len(p) for p in prompts], state.engine.context_length,
                               state.default_max_tokens, state.max_n)
    logprobs = P.logprobs_request(req)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    job = Job(prompts, params, sink=lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev),
              stream=bool(req.stream), strip=strip, logprobs=logprobs, generate=generate)
    try:
        state.engine.submit(job)
    except EngineClosed as e:
        raise P.APIError(503, str(e), None, "shutting_down", "server_error") from None
    return job, events


async def _wait(job, events: asyncio.Queue):
    """The finished completions of a non-streaming job (a failed generation raises its APIError)."""
    try:
        while True:
            event = await events.get()
            if event[0] == "done":
                return event[1]
            if event[0] == "error":
                _, status, message, type_ = event
                raise P.APIError(status, message, None, None, type_)
    finally:
        job.cancelled = True  # no-op when finished; stops the rows if the handler is cancelled


def _sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n"


def _stream(job, events: asyncio.Queue, first: list[dict], chunk, usage_obj, on_done=None) -> StreamingResponse:
    """Server-sent events: ``first``, then a ``chunk`` per delta and finish, the usage object when
    asked for, an error object if generation fails, and ``data: [DONE]``. ``on_done``: awaited with
    the finished completions before the last events (a stream the client leaves early never gets there)."""

    async def gen():
        try:
            for payload in first:
                yield _sse(payload)
            while True:
                event = await events.get()
                kind = event[0]
                if kind == "delta":
                    yield _sse(chunk(event[1], event[2], None))
                elif kind == "finish":
                    yield _sse(chunk(event[1], None, event[2].finish_reason))
                elif kind == "done":
                    if on_done is not None:
                        await on_done(event[1])
                    if usage_obj is not None:
                        yield _sse(usage_obj(event[1]))
                    break
                elif kind == "error":
                    _, status, message, type_ = event
                    yield _sse(P.error_body(message, type_, None, None))
                    break
            yield _sse("[DONE]")
        finally:
            job.cancelled = True  # the client went away: its rows stop at the next step

    return StreamingResponse(gen(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _log_chat(state: ServeState, rid: str, messages: list[dict], params, completions) -> None:
    """Store a chat completion about to be returned, when the server keeps a feedback log; before
    the client has it, so that a rating posted right after finds it."""
    if state.feedback is not None:
        from rlhfkit.serve.feedback import record_chat

        await run_in_threadpool(record_chat, state.feedback, rid, state.served_model_name, messages, params,
                                completions)


def _include_usage(req) -> bool:
    return bool(req.stream_options and req.stream_options.include_usage)


# ------------------------------------------------------------------------------ chat completions
chat_router = APIRouter()


@chat_router.post("/v1/chat/completions")
async def chat_completions(req: P.ChatCompletionRequest, state: ServeState = Depends(serve_state)):
    state.check_model(req.model)
    P.check_unsupported(req)
    messages = P.chat_messages(req)
    try:
        prompt = await run_in_threadpool(_encode_chat, state.engine, messages)
    except Exception as e:  # the chat template refused the conversation
        raise P.APIError(400, f"cannot apply the chat template to 'messages': {e}", "messages",
                         "invalid_value") from None
    job, events = await _submit(state, req, [prompt], strip=True)
    rid, created, name = P.new_id("chatcmpl"), P.now(), state.served_model_name
    if not req.stream:
        completions = await _wait(job, events)
        await _log_chat(state, rid, messages, job.params, completions)
        logprobs = None
        if job.logprobs is not None:
            texts = await run_in_threadpool(_token_texts, state.engine, _scored_ids(job))
            logprobs = [P.chat_logprobs(s, job.logprobs.top, texts.__getitem__) for s in job.scores]
        return P.chat_response(rid, created, name, completions, job.prompt_tokens, logprobs)

    def chunk(index, text, finish_reason):
        delta = {} if text is None else {"content": text}
        return P.chat_chunk(rid, created, name, index, delta, finish_reason)

    first = [P.chat_chunk(rid, created, name, i, {"role": "assistant", "content": ""})
             for i in range(job.num_choices)]
    usage_obj = ((lambda cs: P.usage_chunk(rid, created, name, "chat.completion.chunk", job.prompt_tokens, cs))
                 if _include_usage(req) else None)
    return _stream(job, events, first, chunk, usage_obj,
                   on_done=lambda completions: _log_chat(state, rid, messages, job.params, completions))


# ------------------------------------------------------------------------------ completions
completions_router = APIRouter()


@completions_router.post("/v1/completions")
async def completions(req: P.CompletionRequest, state: ServeState = Depends(serve_state)):
    state.check_model(req.model)
    P.check_unsupported(req)
    texts, token_prompts = P.completion_prompts(req, _vocab_size(state.engine))
    prompts = token_prompts or await run_in_threadpool(_encode_raw, state.engine, texts)
    job, events = await _submit(state, req, prompts, strip=False, generate=req.max_tokens != 0)
    rid, created, name = P.new_id("cmpl"), P.now(), state.served_model_name
    if not req.stream:
        completions = await _wait(job, events)
        extras = await run_in_threadpool(_completion_extras, state.engine, job, texts, bool(req.echo))
        return P.completion_response(rid, created, name, completions, job.prompt_tokens, *extras)

    def chunk(index, text, finish_reason):
        return P.completion_chunk(rid, created, name, index, text or "", finish_reason)

    usage_obj = ((lambda cs: P.usage_chunk(rid, created, name, "text_completion", job.prompt_tokens, cs))
                 if _include_usage(req) else None)
    return _stream(job, events, [], chunk, usage_obj)


def _completion_extras(engine, job, texts: list[str] | None, echo: bool) -> tuple[list[str] | None, list | None]:
    """Per choice: the echoed prompt text (``echo``) and the legacy ``logprobs`` object (when asked).

    The echoed text of a token-id prompt is its decoding with special tokens kept, so that the
    tokens' texts add up to it; ``text_offset`` counts from the start of the prompt text."""
    n = job.params.n
    with engine.tokenizer_lock:
        prompt_texts = texts or [engine.tokenizer.decode(p, skip_special_tokens=False) for p in job.prompts]
    prompt_of = [prompt_texts[c // n] for c in range(job.num_choices)]
    if job.logprobs is None:
        return (prompt_of if echo else None), None
    token_text = _token_texts(engine, _scored_ids(job)).__getitem__
    logprobs = [P.completion_logprobs(job.prompts[c // n], s, echo, job.logprobs.top, token_text,
                                      0 if echo else len(prompt_of[c]))
                for c, s in enumerate(job.scores)]
    return (prompt_of if echo else None), logprobs
