"""Models behind one interface: anything that asks a model for text goes through here.

A judge, a labeller, a reviser, a generator of synthetic data or a candidate in an evaluation
all call ``reply(conversations, temperature, max_tokens, top_logprobs, on_reply)`` (or its
text-only form ``complete``) on one of two implementations:

* :class:`OpenAIChatBackend`: any OpenAI-compatible endpoint (``rlhfkit serve``, vLLM, the
  OpenAI API, ...) through ``httpx``: ``POST {base}/chat/completions``. Up to ``concurrency``
  requests in flight; transient failures (connection errors, timeouts, HTTP 408/409/429/5xx)
  are retried with exponential backoff; anything else becomes a :class:`BackendError` naming
  the endpoint, with the server's own message. The API key is read from an environment
  variable by the caller (:func:`model_backend`) and only ever sent as a bearer token.
* :class:`LocalBackend`: a local checkpoint, hub id or embedded name (``smollm2-135m``)
  decoding on this machine.

Both can return each reply's token log-probabilities with the ``top_logprobs`` most likely
alternatives at every position (OpenAI's ``logprobs``/``top_logprobs``; an endpoint that does
not support them gives ``None``). :class:`ReplyJournal` makes a run resumable: each reply is
appended to a JSONL file as it arrives, keyed by a hash of the request, and a resumed run sends
only the requests that have no reply yet (:func:`journaled_replies`).

Commands take their model with :class:`ModelOptions` (``--model`` or ``--model-url`` +
``--model-name``, ``--api-key-env``) and their judge with :class:`JudgeOptions`
(``--judge-model``, ``--judge-url``, ``--judge-api-key-env``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from rlhfkit.config import arg

Message = dict[str, str]
OnReply = Callable[[int, "Reply"], None]

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


class BackendError(RuntimeError):
    """A backend could not produce a reply (endpoint down, bad key, unknown model, ...)."""


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token, its log-probability and the most likely alternatives there."""

    token: str
    logprob: float
    top: dict[str, float]  # token text -> log-probability (the top_logprobs most likely)


@dataclass(frozen=True)
class Reply:
    """A model's reply: its text and, where the backend returns them, its token log-probs."""

    text: str
    logprobs: tuple[TokenLogprob, ...] | None = None

    def to_json(self) -> dict:
        lps = None if self.logprobs is None else [[t.token, t.logprob, t.top] for t in self.logprobs]
        return {"text": self.text, "logprobs": lps}

    @classmethod
    def from_json(cls, data: dict) -> Reply:
        lps = data.get("logprobs")
        return cls(data["text"], None if lps is None else tuple(TokenLogprob(t, lp, top) for t, lp, top in lps))


@runtime_checkable
class JudgeBackend(Protocol):
    """Anything that turns chats into replies (judges, candidates, labellers, revisers)."""

    name: str

    def complete(self, conversations: Sequence[Sequence[Message]], temperature: float = 0.0,
                 max_tokens: int = 512) -> list[str]:
        ...


def replies(backend, conversations: Sequence[Sequence[Message]], temperature: float = 0.0, max_tokens: int = 512,
            top_logprobs: int = 0, on_reply: OnReply | None = None) -> list[Reply]:
    """``backend.reply(...)`` where the backend has it, else its ``complete`` (text only): so a
    plain object with ``complete`` (a test's scripted judge) serves every command."""
    if hasattr(backend, "reply"):
        return backend.reply(conversations, temperature, max_tokens, top_logprobs=top_logprobs, on_reply=on_reply)
    out = [Reply(t) for t in backend.complete(conversations, temperature, max_tokens)]
    for i, r in enumerate(out):
        if on_reply is not None:
            on_reply(i, r)
    return out


def chat_completions_url(url: str) -> str:
    """The chat-completions URL for a base URL.

    ``http://h:8000/v1`` (the ``openai`` client's convention) and ``http://h:8000`` both give
    ``http://h:8000/v1/chat/completions``; a URL that already ends in ``/chat/completions`` is
    used as is.
    """
    return _api_url(url, "/chat/completions")


def completions_url(url: str) -> str:
    """The (text) completions URL for a base URL, as :func:`chat_completions_url` finds the chat one:
    ``http://h:8000/v1`` and ``http://h:8000`` both give ``http://h:8000/v1/completions``."""
    return _api_url(url, "/completions")


def _api_url(url: str, route: str) -> str:
    u = url.strip().rstrip("/")
    if u.endswith(route):
        return u
    if re.search(r"/v\d+[a-z]*$", u):
        return u + route
    return u + "/v1" + route


def redact_url(url: str) -> str:
    """The URL without any ``user:password@`` part (for messages and reports)."""
    return re.sub(r"(?<=://)[^/@]*@", "", url)


def _error_message(response: Any) -> str:
    try:
        data = response.json()
    except (ValueError, json.JSONDecodeError):
        text = response.text.strip()
        return text[:300] if text else response.reason_phrase
    if isinstance(data, dict):
        err = data.get("error", data.get("detail", data))
        if isinstance(err, dict):
            return str(err.get("message") or err)[:300]
        return str(err)[:300]
    return str(data)[:300]


def _parse_logprobs(choice: dict) -> tuple[TokenLogprob, ...] | None:
    """OpenAI's ``choices[0].logprobs.content`` as TokenLogprobs (None when absent)."""
    content = (choice.get("logprobs") or {}).get("content") if isinstance(choice.get("logprobs"), dict) else None
    if not isinstance(content, list):
        return None
    out = []
    for item in content:
        top = {t["token"]: float(t["logprob"]) for t in item.get("top_logprobs") or []}
        out.append(TokenLogprob(item["token"], float(item["logprob"]), top))
    return tuple(out)


class OpenAIChatBackend:
    """An OpenAI-compatible ``/v1/chat/completions`` endpoint, called with ``httpx``.

    ``api_key`` is sent as a bearer token when given (never logged). Up to ``concurrency``
    requests are in flight at once; replies keep the order of the chats. An endpoint that
    refuses ``logprobs`` (HTTP 400 on a request that asked for them) is asked again without
    them, and not asked for them again.
    """

    def __init__(self, base_url: str, model: str, api_key: str | None = None,
                 timeout: float = 120.0, concurrency: int = 4, retries: int = 3,
                 retry_wait: float = 1.0, role: str = "judge", client: Any = None,
                 key_env: str | None = None, sampling: dict | None = None):
        import httpx

        self.url = chat_completions_url(base_url)
        self.model = model
        self.name = model
        self.role = role
        self.concurrency = max(1, int(concurrency))
        self.retries = max(0, int(retries))
        self.retry_wait = retry_wait
        self.key_env = key_env
        self.logprobs_supported = True
        self.sampling = dict(sampling or {})  # more OpenAI sampling fields for every request (top_p, stop)
        headers = {"Content-Type": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._client = client or httpx.Client(timeout=timeout, headers=headers)
        self._timeout = timeout

    def _where(self) -> str:
        return f"{self.role} endpoint {redact_url(self.url)} (model {self.model!r})"

    def _payload(self, messages: Sequence[Message], temperature: float, max_tokens: int, top_logprobs: int) -> dict:
        payload = {"model": self.model, "messages": list(messages), "temperature": temperature,
                   "max_tokens": max_tokens, **self.sampling}
        if top_logprobs and self.logprobs_supported:
            payload.update(logprobs=True, top_logprobs=top_logprobs)
        return payload

    def _post(self, payload: dict):
        """The endpoint's response, retried on transient failures; BackendError otherwise."""
        import httpx

        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.retry_wait * 2 ** (attempt - 1))
            try:
                response = self._client.post(self.url, json=payload)
            except httpx.TimeoutException:
                last = f"{self._where()}: no answer within {self._timeout:g} s"
                continue
            except httpx.TransportError as e:
                last = f"{self._where()}: cannot connect ({type(e).__name__}: {e}); is the server running?"
                continue
            if response.status_code in RETRY_STATUS:
                last = f"{self._where()}: HTTP {response.status_code}: {_error_message(response)}"
                continue
            return response
        raise BackendError(last + f" (after {self.retries + 1} attempts)")

    def _one(self, messages: Sequence[Message], temperature: float, max_tokens: int, top_logprobs: int = 0) -> Reply:
        payload = self._payload(messages, temperature, max_tokens, top_logprobs)
        response = self._post(payload)
        if response.status_code == 400 and "logprobs" in payload:
            self.logprobs_supported = False  # e.g. an endpoint without logprobs: ask plainly
            response = self._post(self._payload(messages, temperature, max_tokens, 0))
        if response.status_code >= 400:
            hint = ""
            if response.status_code in (401, 403) and self.key_env:
                hint = f" (the API key is read from the environment variable {self.key_env})"
            raise BackendError(f"{self._where()}: HTTP {response.status_code}: {_error_message(response)}{hint}")
        try:
            choice = response.json()["choices"][0]
            content = choice["message"].get("content")
            logprobs = _parse_logprobs(choice) if top_logprobs else None
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise BackendError(f"{self._where()}: unexpected response (not an OpenAI chat "
                               f"completion): {response.text[:200]!r}") from None
        return Reply(content if isinstance(content, str) else "", logprobs)

    def reply(self, conversations: Sequence[Sequence[Message]], temperature: float = 0.0, max_tokens: int = 512,
              top_logprobs: int = 0, on_reply: OnReply | None = None) -> list[Reply]:
        """One reply per chat, in order; ``on_reply(i, reply)`` is called as each one arrives."""
        if not conversations:
            return []
        out: list[Reply | None] = [None] * len(conversations)
        if self.concurrency == 1 or len(conversations) == 1:
            for i, c in enumerate(conversations):
                out[i] = self._one(c, temperature, max_tokens, top_logprobs)
                if on_reply is not None:
                    on_reply(i, out[i])
            return out
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(conversations))) as pool:
            futures = {pool.submit(self._one, c, temperature, max_tokens, top_logprobs): i
                       for i, c in enumerate(conversations)}
            try:
                for future in as_completed(futures):
                    i = futures[future]
                    out[i] = future.result()
                    if on_reply is not None:
                        on_reply(i, out[i])
            except BaseException:
                for f in futures:
                    f.cancel()
                # Replies already answered (or in flight) when one request failed are still reported:
                # a journal records them, and a resumed run does not send them again.
                for f, i in futures.items():
                    if out[i] is None and not f.cancelled() and f.exception() is None:
                        out[i] = f.result()
                        if on_reply is not None:
                            on_reply(i, out[i])
                raise
        return out

    def complete(self, conversations: Sequence[Sequence[Message]], temperature: float = 0.0,
                 max_tokens: int = 512) -> list[str]:
        return [r.text for r in self.reply(conversations, temperature, max_tokens)]

    def close(self) -> None:
        self._client.close()


class LocalBackend:
    """A local model (path, hub id or embedded name) decoding on this machine.

    Greedy decoding at temperature 0, otherwise sampling with the given temperature (seeded).
    A prompt longer than the model's context is cut from the left: the judge prompts end
    with their output contract, which is the part that must survive. Token log-probabilities
    (``top_logprobs > 0``) are those of the untempered model, read in one teacher-forced pass
    over each prompt and its reply.
    """

    def __init__(self, model: str, dtype: str = "float32", batch_size: int = 4, seed: int = 0):
        from rlhfkit.models.loading import load_policy

        self.name = model
        self.batch_size = batch_size
        self.seed = seed
        try:
            self.model, self.tokenizer = load_policy(model, dtype=dtype)
        except (OSError, ValueError) as e:  # load_policy raises InputError itself for bad names
            raise BackendError(f"cannot load model {model!r}: {e}") from e

    def _max_prompt(self, max_tokens: int) -> int | None:
        limit = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        return max(1, int(limit) - max_tokens) if isinstance(limit, int) else None

    def reply(self, conversations: Sequence[Sequence[Message]], temperature: float = 0.0, max_tokens: int = 512,
              top_logprobs: int = 0, on_reply: OnReply | None = None) -> list[Reply]:
        from rlhfkit.data.chat import encode_prompt
        from rlhfkit.generation.decoding import SamplingParams, decode_response, generate_ids

        if not conversations:
            return []
        sample = bool(temperature and temperature > 0)
        out: list[Reply] = []
        for start in range(0, len(conversations), self.batch_size):
            chunk = [list(c) for c in conversations[start:start + self.batch_size]]
            # Seeded by the chats themselves: a different request draws a different stream, and the
            # same request (a resumed run) draws the same one.
            params = SamplingParams(strategy="sample" if sample else "greedy", max_new_tokens=max_tokens,
                                    temperature=temperature if sample else 1.0, n=1,
                                    seed=int(request_key(self.seed, chunk), 16) % 2**31 if sample else None)
            prompt_ids = [encode_prompt(self.tokenizer, c, self._max_prompt(max_tokens)) for c in chunk]
            responses = [rows[0] for rows in generate_ids(self.model, self.tokenizer, prompt_ids, params,
                                                          self.batch_size)]
            for p, r in zip(prompt_ids, responses):
                logprobs = self._top_logprobs(p, r, top_logprobs) if top_logprobs else None
                out.append(Reply(decode_response(self.tokenizer, r), logprobs))
                if on_reply is not None:
                    on_reply(len(out) - 1, out[-1])
        return out

    def _top_logprobs(self, prompt_ids: list[int], response_ids: list[int], k: int) -> tuple[TokenLogprob, ...]:
        from rlhfkit.models.token_scores import score_tokens

        if not response_ids:
            return ()
        (scores,) = score_tokens(self.model, [prompt_ids + response_ids], [len(prompt_ids)], top=k)
        decode = self.tokenizer.decode
        return tuple(TokenLogprob(decode([tok]), logp, {decode([a]): v for a, v in alts})
                     for tok, logp, alts in zip(scores.token_ids, scores.logps, scores.top))

    def complete(self, conversations: Sequence[Sequence[Message]], temperature: float = 0.0,
                 max_tokens: int = 512) -> list[str]:
        return [r.text for r in self.reply(conversations, temperature, max_tokens)]

    def close(self) -> None:
        self.model = None
        self.tokenizer = None


# --------------------------------------------------------------------------------------------
# Resumable requests
# --------------------------------------------------------------------------------------------


def request_key(*parts: Any) -> str:
    """A stable identifier of a request (model, messages, sampling settings, ...)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:32]


class ReplyJournal:
    """Replies appended to a JSONL file as they arrive, keyed by :func:`request_key`.

    Reopening the same file restores every finished reply, so a resumed run sends none of
    those requests again. Each line is flushed and fsynced before the next request's reply is
    recorded; a last line cut short by a crash is dropped on reopening (its request is sent
    again: it never had a complete reply).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._done: dict[str, Reply] = {}
        self._lock = threading.Lock()
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        text = self.path.read_text(encoding="utf-8")
        good = 0
        for line in text.splitlines(keepends=True):
            try:
                record = json.loads(line)
                self._done[record["key"]] = Reply.from_json(record)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                break  # a torn last line: everything after it is dropped
            good += len(line.encode("utf-8"))
        if good < len(text.encode("utf-8")):
            with open(self.path, "r+b") as f:
                f.truncate(good)

    def __contains__(self, key: str) -> bool:
        return key in self._done

    def __len__(self) -> int:
        return len(self._done)

    def get(self, key: str) -> Reply:
        return self._done[key]

    def add(self, key: str, reply: Reply) -> None:
        line = json.dumps({"key": key, **reply.to_json()}, ensure_ascii=False) + "\n"
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
            self._done[key] = reply


def reseeded(backend, offset: int):
    """``backend`` drawing another sample stream: a local model's seed moved by ``offset``.

    A local model seeds its sampling from its seed and the chats (:class:`LocalBackend`), so the same
    chat sent again draws the same sample; a repeat that must be a fresh draw (a judge's grade asked
    R times) goes to a shallow copy with another seed, sharing the loaded weights. An endpoint is
    not seeded by us (each request is a fresh draw) and is returned as is, as is any backend at offset 0.
    """
    if offset == 0 or not isinstance(getattr(backend, "seed", None), int):
        return backend
    clone = copy.copy(backend)
    clone.seed = backend.seed + offset
    return clone


def journaled_replies(backend, conversations: Sequence[Sequence[Message]], keys: Sequence[str],
                      journal: ReplyJournal, temperature: float = 0.0, max_tokens: int = 512,
                      top_logprobs: int = 0) -> list[Reply]:
    """Replies for ``conversations``, sending only those whose key the journal lacks.

    Each new reply is recorded as it arrives: an interruption (or a BackendError) loses none of
    the replies received before it. A key given twice is sent once (the same request has one
    reply, as it would after a resume).
    """
    first = {}
    for i, k in enumerate(keys):
        first.setdefault(k, i)
    missing = [i for k, i in first.items() if k not in journal]
    if missing:
        replies(backend, [conversations[i] for i in missing], temperature, max_tokens, top_logprobs,
                on_reply=lambda j, r: journal.add(keys[missing[j]], r))
    return [journal.get(k) for k in keys]


class JournaledModel:
    """One model's requests through a :class:`ReplyJournal`, the backend built by ``build()`` on the
    first request the journal lacks: a finished run reruns from its journal alone, loading no model
    and sending nothing. ``sent`` counts the requests this object sent."""

    def __init__(self, journal: ReplyJournal, build: Callable[[], object], temperature: float, max_tokens: int,
                 top_logprobs: int = 0):
        self.journal, self.build = journal, build
        self.temperature, self.max_tokens, self.top_logprobs = temperature, max_tokens, top_logprobs
        self.backend = None
        self.sent = 0

    def send(self, chats: Sequence[Sequence[Message]], keys: Sequence[str], stream: int = 0) -> None:
        """Ask for the replies of ``chats`` the journal lacks (under ``keys``). ``stream``: a local
        model's sampling-seed offset (:func:`reseeded`), so that a k-th sample is a fresh draw."""
        missing = {k for k in keys if k not in self.journal}
        if not missing:
            return
        if self.backend is None:
            self.backend = self.build()
        self.sent += len(missing)
        journaled_replies(reseeded(self.backend, stream), chats, keys, self.journal, self.temperature,
                          self.max_tokens, self.top_logprobs)

    def close(self) -> None:
        getattr(self.backend, "close", lambda: None)()


# --------------------------------------------------------------------------------------------
# The flags every command that talks to a model shares
# --------------------------------------------------------------------------------------------


@dataclass
class TransportOptions:
    """How requests reach a model, local or endpoint (every command that asks a model for text)."""

    concurrency: int = arg(4, "Requests in flight per endpoint.")
    request_timeout: float = arg(120.0, "Seconds to wait for one endpoint request (retried on timeouts, "
                                 "connection errors and HTTP 408/409/429/5xx with exponential backoff).")
    dtype: Literal["float32", "bfloat16"] = arg("float32", "Parameter dtype of local models.")
    generation_batch_size: int = arg(4, "Conversations per generate call of a local model.")

    def transport_problems(self) -> list[str]:
        problems = []
        if self.concurrency < 1 or self.generation_batch_size < 1:
            problems.append("--concurrency and --generation-batch-size must be >= 1")
        if self.request_timeout <= 0:
            problems.append("--request-timeout must be > 0")
        return problems


@dataclass
class ModelOptions(TransportOptions):
    """The model a command asks for text: a local one, or an OpenAI-compatible endpoint."""

    model: str = arg("smollm2-135m", "Local model: a path, hub id or embedded name (used when --model-url is "
                     "empty).")
    model_url: str = arg("", "OpenAI-compatible endpoint instead of a local model (e.g. "
                         "http://127.0.0.1:8000/v1 from `rlhfkit serve`, vLLM, a hosted API).")
    model_name: str = arg("", "The model name sent to --model-url (required with it).")
    api_key_env: str = arg("OPENAI_API_KEY", "Environment variable holding --model-url's API key (unset: no "
                           "key sent; the key is never written anywhere).")

    def model_problems(self) -> list[str]:
        problems = []
        if self.model_url and not self.model_name:
            problems.append("--model-url needs --model-name (the model to request from it)")
        if self.model_name and not self.model_url:
            problems.append("--model-name is sent to --model-url; give --model-url too (or use --model for a "
                            "local model)")
        if not self.model_url and not self.model:
            problems.append("--model or --model-url is required")
        return problems + self.transport_problems()


@dataclass
class JudgeOptions:
    """The judge a command asks for verdicts: a local model or an OpenAI-compatible endpoint.

    A command whose only model is its judge (``ai-label``) takes it with :class:`TransportOptions`;
    one that also generates, with :class:`ModelOptions`.
    """

    judge_model: str = arg("smollm2-135m", "Judge: the model name sent to --judge-url, or (without it) a local "
                           "path, hub id or embedded name.")
    judge_url: str = arg("", "OpenAI-compatible judge endpoint (empty: a local judge model).")
    judge_api_key_env: str = arg("OPENAI_API_KEY", "Environment variable holding the judge's API key (unset: no "
                                 "key sent; never written anywhere).")

    def judge_problems(self) -> list[str]:
        if self.judge_url and not self.judge_model:
            return ["--judge-url needs --judge-model (the model to request from it)"]
        if not self.judge_url and not self.judge_model:
            return ["--judge-model is required"]
        return []


def make_backend(local: str, url: str, name: str, key_env: str, *, role: str, concurrency: int = 4,
                 timeout: float = 120.0, dtype: str = "float32", batch_size: int = 4, seed: int = 0,
                 sampling: dict | None = None):
    """An endpoint backend when ``url`` is given (the key read from ``key_env``), else a local model.
    ``sampling``: more OpenAI request fields for an endpoint (``top_p``, ``stop``); a local model
    takes none."""
    if url:
        return OpenAIChatBackend(url, name, api_key=os.environ.get(key_env) or None, timeout=timeout,
                                 concurrency=concurrency, role=role, key_env=key_env, sampling=sampling)
    if sampling:
        raise ValueError(f"sampling fields {sorted(sampling)} are sent to an endpoint; a local model takes none")
    return LocalBackend(local, dtype=dtype, batch_size=batch_size, seed=seed)


def model_backend(cfg, role: str = "model", sampling: dict | None = None):
    """The backend of a config with :class:`ModelOptions` (and a ``seed``)."""
    return make_backend(cfg.model, cfg.model_url, cfg.model_name, cfg.api_key_env, role=role,
                        concurrency=cfg.concurrency, timeout=cfg.request_timeout, dtype=cfg.dtype,
                        batch_size=cfg.generation_batch_size, seed=getattr(cfg, "seed", 0), sampling=sampling)


def judge_backend(cfg):
    """The backend of a config with :class:`JudgeOptions` and :class:`TransportOptions` (or ModelOptions)."""
    return make_backend(cfg.judge_model, cfg.judge_url, cfg.judge_model, cfg.judge_api_key_env, role="judge",
                        concurrency=cfg.concurrency, timeout=cfg.request_timeout, dtype=cfg.dtype,
                        batch_size=cfg.generation_batch_size, seed=getattr(cfg, "seed", 0))


def endpoint_label(url: str, model: str) -> str:
    """How outputs name an endpoint's model: ``chat-completions-url (model)``, without credentials."""
    return f"{redact_url(chat_completions_url(url))} ({model})"


def backend_label(backend) -> str:
    """How outputs name a backend: ``url (model)`` for an endpoint (no credentials), else its name."""
    if isinstance(backend, OpenAIChatBackend):
        return endpoint_label(backend.url, backend.model)
    return str(getattr(backend, "name", type(backend).__name__))
