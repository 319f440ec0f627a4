"""``rlhfkit serve``: an OpenAI-compatible HTTP server over any checkpoint.

Endpoints: ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/chat/completions`` and
``POST /v1/completions`` (both with ``stream: true`` as server-sent events ending in
``data: [DONE]``), plus ``GET /health`` and ``GET /stats`` (the batching counters).

The model belongs to one background worker (:class:`rlhfkit.serve.engine.Engine`) that batches
compatible concurrent requests into one ``generate`` call. Every error, including a failed
generation, is answered as OpenAI's JSON error object; bad requests get a 4xx status.

Python use (tests, judges, arenas)::

    from rlhfkit.serve.server import start_background
    with start_background("smollm2-135m") as server:      # a free port on 127.0.0.1
        client = openai.OpenAI(base_url=server.base_url, api_key="x")
"""


import hmac
import logging
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Literal

from rlhfkit.config import arg, validated
from rlhfkit.errors import InputError

log = logging.getLogger("rlhfkit.serve")

MAX_REQUEST_BYTES = 16 * 2 ** 20


@dataclass
class Config:
    """Serve a checkpoint over an OpenAI-compatible HTTP API."""

    model: str = arg("smollm2-135m", "Model: an embedded name (smollm2-135m), a local folder, a LoRA adapter "
                     "folder, or a hub id.")
    host: str = arg("127.0.0.1", "Address to listen on (0.0.0.0 for every interface).")
    port: int = arg(8000, "Port to listen on (0: any free port, printed at start).")
    served_model_name: str = arg("", "Model id that clients send and /v1/models lists (default: --model).")
    dtype: Literal["float32", "bfloat16"] = arg("float32", "Parameter dtype.")
    max_batch_size: int = arg(8, "Most sequences decoded together in one generate call.")
    batch_wait_ms: float = arg(5.0, "How long the worker waits for more requests to batch with the first one.")
    max_n: int = arg(16, "Largest `n` (choices per request) accepted.")
    default_max_tokens: int = arg(256, "Completion length when a request gives no max_tokens "
                                  "(capped by the room left in the context).")
    max_length: int = arg(0, "Context length: most tokens of prompt plus completion; 0: the model's own.",
                          aliases=("max_context",))
    threads: int = arg(0, "torch CPU threads; 0 keeps torch's default.")
    api_key_env: str = arg("", "Name of an environment variable holding an API key; when set, requests "
                           "need `Authorization: Bearer <key>`.")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = arg("info", "uvicorn log level.")
    feedback_db: str = arg("", "Store every chat completion returned, and accept thumbs up/down at POST "
                           "/v1/feedback: a file path for SQLite or a SQLAlchemy URL (docs/serve.md, Feedback).")

    def validate(self) -> list[str]:
        problems = []
        if not 0 <= self.port <= 65535:
            problems.append(f"--port must be in 0..65535 (got {self.port})")
        for name in ("max_batch_size", "max_n", "default_max_tokens"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(self, name)})")
        for name in ("max_length", "threads"):
            if getattr(self, name) < 0:
                problems.append(f"--{name.replace('_', '-')} must be >= 0 (got {getattr(self, name)})")
        if self.feedback_db:
            from rlhfkit.label.commands import db_problems

            problems += [p.replace("--db", "--feedback-db", 1) for p in db_problems(self.feedback_db)]
        if self.batch_wait_ms < 0:
            problems.append(f"--batch-wait-ms must be >= 0 (got {self.batch_wait_ms})")
        if self.api_key_env and not os.environ.get(self.api_key_env):
            problems.append(f"--api-key-env: the environment variable {self.api_key_env} is not set")
        return problems


# ------------------------------------------------------------------------------ the app
def create_app(engine, served_model_name: str, *, max_n: int = 16, default_max_tokens: int = 256,
               api_key: str | None = None, feedback=None):
    """The FastAPI application answering with ``engine`` under the id ``served_model_name``.

    The routes live in :mod:`rlhfkit.serve.routes` and read what they share from ``app.state.serve``.
    ``feedback``: a :class:`rlhfkit.serve.feedback.FeedbackStore` that logs every chat completion
    returned and backs ``POST /v1/feedback``; None: neither.
    """
    from fastapi import FastAPI

    from rlhfkit.serve import protocol as P
    from rlhfkit.serve.routes import ServeState, chat_router, completions_router, models_router

    app = FastAPI(title="rlhfkit serve", version="1", docs_url=None, redoc_url=None)
    app.state.serve = ServeState(engine, served_model_name, P.now(), max_n, default_max_tokens, feedback)
    app.state.feedback = feedback
    app.state.engine, app.state.served_model_name = engine, served_model_name  # for code embedding the app
    _add_error_handlers(app)
    app.add_middleware(_Guard, api_key=api_key)
    for router in (models_router, chat_router, completions_router):
        app.include_router(router)
    if feedback is not None:
        from rlhfkit.serve.feedback import feedback_router

        app.include_router(feedback_router)
    return app


def _add_error_handlers(app) -> None:
    """Every error as OpenAI's JSON error object, never FastAPI's default bodies or HTML."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from rlhfkit.serve.protocol import APIError, error_body

    async def api_error(request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    async def validation_error(request, exc: RequestValidationError):
        return _validation_response(exc.errors())

    async def http_error(request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
        return JSONResponse(error_body(message, "invalid_request_error", None, code), status_code=exc.status_code)

    async def unexpected(request, exc: Exception):  # a bug: still a JSON error, never HTML
        log.exception("unexpected error")
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "server_error"), status_code=500)

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)


class _Guard:
    """ASGI middleware: refuse oversized bodies (by Content-Length), check the API key, and read
    every POST body under /v1/ as JSON whatever its Content-Type (``curl -d`` sends a form type)."""

    def __init__(self, app, api_key: str | None = None):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = dict(scope.get("headers") or [])
            length = headers.get(b"content-length", b"0").decode("latin-1")
            problem = None
            if not length.isdigit() or int(length) > MAX_REQUEST_BYTES:
                problem = (413, f"request body larger than {MAX_REQUEST_BYTES} bytes", "request_too_large",
                           "invalid_request_error")
            elif self.api_key is not None and scope.get("path", "").startswith("/v1/"):
                given = headers.get(b"authorization", b"")
                if not hmac.compare_digest(given, f"Bearer {self.api_key}".encode()):
                    problem = (401, "invalid or missing API key (Authorization: Bearer ...)", "invalid_api_key",
                               "authentication_error")
            if problem:
                from fastapi.responses import JSONResponse

                from rlhfkit.serve.protocol import error_body

                status, message, code, type_ = problem
                await JSONResponse(error_body(message, type_, None, code), status_code=status)(scope, receive, send)
                return
            if scope.get("method") == "POST" and scope.get("path", "").startswith("/v1/") and \
                    b"json" not in headers.get(b"content-type", b""):
                scope = dict(scope)
                scope["headers"] = [(k, v) for k, v in scope["headers"] if k != b"content-type"] + [
                    (b"content-type", b"application/json")]
        await self.app(scope, receive, send)


def _validation_response(errors: list[dict], status: int = 400):
    """FastAPI's 422 validation errors as one OpenAI-style error (400; /v1/feedback answers 422)."""
    from fastapi.responses import JSONResponse

    from rlhfkit.serve.protocol import error_body

    # the deepest location names the offending item best (a union reports every member)
    err = max(errors, key=lambda e: len(e.get("loc", ()))) if errors else {}
    kind = err.get("type", "")
    loc = [p for p in err.get("loc", ()) if p != "body"]
    if kind == "json_invalid":
        detail = (err.get("ctx") or {}).get("error", "")
        message, param, code = f"the request body is not valid JSON ({detail})".replace(" ()", ""), None, "invalid_json"
    elif not loc:
        message, param, code = "the request body must be a JSON object", None, "invalid_body"
    else:
        # pydantic reports a failed union member as an extra location step ("str", "list[...]")
        path = [p for p in loc if isinstance(p, int) or not (p in ("str", "int", "float", "bool")
                                                            or "[" in str(p) or str(p)[:1].isupper())]
        param = ""
        for p in path:
            param += f"[{p}]" if isinstance(p, int) else (f".{p}" if param else str(p))
        if kind == "missing":
            message = f"'{param}' is required"
        else:
            message = f"invalid value for '{param}': {err.get('msg', 'invalid')}"
        code = "missing_required_parameter" if kind == "missing" else "invalid_type"
    return JSONResponse(error_body(message, "invalid_request_error", param, code), status_code=status)


# ------------------------------------------------------------------------------ running it
def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _url(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else (f"[{host}]" if ":" in host else host)
    return f"http://{shown}:{port}"


def _open_feedback(db: str | None):
    """The feedback store of ``--feedback-db`` (None without one)."""
    if not db:
        return None
    from rlhfkit.serve.feedback import open_store

    return open_store(db)


def _load(model, tokenizer, dtype: str):
    from rlhfkit.models.loading import load_policy, load_tokenizer, set_distinct_pad_token

    if isinstance(model, str):
        loaded, tok = load_policy(model, dtype)
        if tokenizer is not None:
            tok = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
        return loaded, tok
    if tokenizer is None:
        name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", "")
        if not name:
            raise ValueError("start_background: pass the tokenizer (or its name) with a model object")
        tokenizer = name
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    if tok.pad_token is None:
        set_distinct_pad_token(tok)
    model.eval()
    return model, tok


class ServerHandle:
    """A server running in a background thread: ``.url``, ``.base_url`` (``url + "/v1"``),
    ``.model_name``, ``.engine`` (``.engine.stats()``), ``.stop()``; also a context manager."""

    def __init__(self, server, thread: threading.Thread, engine, url: str, model_name: str, feedback=None):
        self._server, self._thread, self.engine, self.feedback = server, thread, engine, feedback
        self.url, self.base_url, self.model_name = url, url + "/v1", model_name
        self.port = int(url.rsplit(":", 1)[1])

    def stop(self, timeout: float = 30.0) -> None:
        self.engine.stop(timeout)
        self._server.should_exit = True
        self._thread.join(timeout)
        if self.feedback is not None:
            self.feedback.dispose()

    def __enter__(self) -> "ServerHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"ServerHandle({self.model_name!r} at {self.base_url})"


def start_background(model, tokenizer=None, *, port: int = 0, host: str = "127.0.0.1",
                     served_model_name: str | None = None, dtype: str = "float32", max_batch_size: int = 8,
                     batch_wait_ms: float = 5.0, max_n: int = 16, default_max_tokens: int = 256,
                     max_context: int = 0, api_key: str | None = None, feedback_db: str | None = None,
                     log_level: str = "warning", startup_timeout: float = 60.0) -> ServerHandle:
    """Serve ``model`` from a background thread; returns once it accepts connections.

    ``model``: a name or path (loaded with :func:`rlhfkit.models.loading.load_policy`) or a
    loaded causal LM; ``tokenizer``: a tokenizer, a name to load one from, or None (from
    ``model``). ``port=0`` picks a free port (``handle.url`` tells which). The served id is
    ``served_model_name``, else the model string, else the model's ``name_or_path``.
    ``feedback_db``: as ``--feedback-db`` (log chat completions, accept ``POST /v1/feedback``).
    The engine then owns the model: do not train or generate with it until ``stop()``.
    """
    import uvicorn

    from rlhfkit.serve.engine import Engine

    feedback = _open_feedback(feedback_db)
    loaded, tok = _load(model, tokenizer, dtype)
    name = served_model_name or (model if isinstance(model, str) else getattr(loaded, "name_or_path", "") or "model")
    engine = Engine(loaded, tok, max_batch_size=max_batch_size, batch_wait_ms=batch_wait_ms,
                    context_length=max_context or None)
    app = create_app(engine, name, max_n=max_n, default_max_tokens=default_max_tokens, api_key=api_key,
                     feedback=feedback)
    sock = _bind(host, port)
    config = uvicorn.Config(app, log_level=log_level, lifespan="off", timeout_graceful_shutdown=5,
                            access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="rlhfkit-serve-http",
                              daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            engine.stop()
            server.should_exit = True
            if feedback is not None:
                feedback.dispose()
            raise RuntimeError(f"the server did not start on {host}:{sock.getsockname()[1]}")
        time.sleep(0.01)
    return ServerHandle(server, thread, engine, _url(host, sock.getsockname()[1]), name, feedback)


def main(cfg: Config) -> int:
    import torch
    import uvicorn

    from rlhfkit.serve.engine import Engine

    if validated(cfg).threads:
        torch.set_num_threads(cfg.threads)
    sock = _bind(cfg.host, cfg.port)  # fail before loading the model if the port is taken
    feedback = _open_feedback(cfg.feedback_db)  # and if the feedback database cannot be opened
    model, tokenizer = _load(cfg.model, None, cfg.dtype)
    name = cfg.served_model_name or cfg.model
    engine = Engine(model, tokenizer, max_batch_size=cfg.max_batch_size, batch_wait_ms=cfg.batch_wait_ms,
                    context_length=cfg.max_length or None)
    api_key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
    app = create_app(engine, name, max_n=cfg.max_n, default_max_tokens=cfg.default_max_tokens, api_key=api_key,
                     feedback=feedback)
    url = _url(cfg.host, sock.getsockname()[1])
    print(f"rlhfkit serve: '{name}' at {url}/v1 (context {engine.context_length} tokens, "
          f"batches of up to {cfg.max_batch_size}, wait {cfg.batch_wait_ms:g} ms)", file=sys.stderr, flush=True)
    if feedback is not None:
        print(f"rlhfkit serve: logging chat completions and POST /v1/feedback to "
              f"{feedback.db.engine.url.render_as_string(hide_password=True)}", file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level=cfg.log_level, lifespan="off",
                                           timeout_graceful_shutdown=5))
    try:
        server.run(sockets=[sock])
    finally:
        engine.stop()
        if feedback is not None:
            feedback.dispose()
    return 0
