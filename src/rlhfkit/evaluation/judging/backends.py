"""Chat backends for judges and candidates: one small interface, two implementations.

``complete(conversations, temperature, max_tokens) -> list[str]`` takes a list of chats (each
a list of ``{"role", "content"}`` messages) and returns one reply per chat, in order. Anything
with that method works as a judge or as a candidate answer generator (tests pass a plain
object returning canned strings).

* :class:`OpenAIChatBackend`: any OpenAI-compatible endpoint (``rlhfkit serve``, vLLM, the
  OpenAI API, ...) through ``httpx``: ``POST {base}/chat/completions``. Transient failures
  (connection errors, timeouts, HTTP 408/409/429/5xx) are retried with exponential backoff;
  anything else becomes a :class:`BackendError` with the server's own error message.
* :class:`LocalBackend`: a local checkpoint, hub id or embedded name (``smollm2-135m``)
  through :func:`rlhfkit.models.loading.load_policy` and
  :func:`rlhfkit.generation.decoding.generate_chat`, imported only when used.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, runtime_checkable

Message = dict[str, str]

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


class BackendError(RuntimeError):
    """A backend could not produce a reply (endpoint down, bad key, unknown model, ...)."""


@runtime_checkable
class JudgeBackend(Protocol):
    """Anything that turns chats into replies (used for judges and for candidates)."""

    name: str

    def complete(self, conversations: Sequence[Sequence[Message]], temperature: float = 0.0,
                 max_tokens: int = 512) -> list[str]:
        ...


def chat_completions_url(url: str) -> str:
    """The chat-completions URL for a base URL.

    ``http://h:8000/v1`` (the ``openai`` client's convention) and ``http://h:8000`` both give
    ``http://h:8000/v1/chat/completions``; a URL that already ends in ``/chat/completions`` is
    used as is.
    """
    u = url.strip().rstrip("/")
    if u.endswith("/chat/completions"):
        return u
    if re.search(r"/v\d+[a-z]*$", u):
        return u + "/chat/completions"
    return u + "/v1/chat/completions"


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


class OpenAIChatBackend:
    """An OpenAI-compatible ``/v1/chat/completions`` endpoint, called with ``httpx``.

    ``api_key`` is sent as a bearer token when given (never logged). Up to ``concurrency``
    requests are in flight at once; replies keep the order of the chats.
    """

    def __init__(self, base_url: str, model: str, api_key: str | None = None,
                 timeout: float = 120.0, concurrency: int = 4, retries: int = 3,
                 retry_wait: float = 1.0, role: str = "judge", client: Any = None,
                 key_env: str | None = None):
        import httpx

        self.url = chat_completions_url(base_url)
        self.model = model
        self.name = model
        self.role = role
        self.concurrency = max(1, int(concurrency))
        self.retries = max(0, int(retries))
        self.retry_wait = retry_wait
        self.key_env = key_env
        headers = {"Content-Type": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._client = client or httpx.Client(timeout=timeout, headers=headers)
        self._timeout = timeout

    def _where(self) -> str:
        return f"{self.role} endpoint {redact_url(self.url)} (model {self.model!r})"

    def _one(self, messages: Sequence[Message], temperature: float, max_tokens: int) -> str:
        import httpx

        payload = {"model": self.model, "messages": list(messages), "temperature": temperature,
                   "max_tokens": max_tokens}
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
            if response.status_code >= 400:
                hint = ""
                if response.status_code in (401, 403) and self.key_env:
                    hint = f" (the API key is read from the environment variable {self.key_env})"
                raise BackendError(f"{self._where()}: HTTP {response.status_code}: "
                                   f"{_error_message(response)}{hint}")
            try:
                data = response.json()
                content = data["choices"][0]["message"].get("content")
            except (ValueError, KeyError, IndexError, TypeError, AttributeError):
                raise BackendError(f"{self._where()}: unexpected response (not an OpenAI chat "
                                   f"completion): {response.text[:200]!r}") from None
            return content if isinstance(content, str) else ""
        raise BackendError(last + f" (after {self.retries + 1} attempts)")

    def complete(self, conversations: Sequence[Sequence[Message]], temperature: float = 0.0,
                 max_tokens: int = 512) -> list[str]:
        if not conversations:
            return []
        if self.concurrency == 1 or len(conversations) == 1:
            return [self._one(c, temperature, max_tokens) for c in conversations]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(conversations))) as pool:
            futures = [pool.submit(self._one, c, temperature, max_tokens) for c in conversations]
            try:
                return [f.result() for f in futures]
            except BaseException:
                for f in futures:
                    f.cancel()
                raise

    def close(self) -> None:
        self._client.close()


class LocalBackend:
    """A local model (path, hub id or embedded name) decoding on this machine.

    Greedy decoding at temperature 0, otherwise sampling with the given temperature (seeded).
    A prompt longer than the model's context is cut from the left: the judge prompts end
    with their output contract, which is the part that must survive.
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

    def complete(self, conversations: Sequence[Sequence[Message]], temperature: float = 0.0,
                 max_tokens: int = 512) -> list[str]:
        from rlhfkit.generation.decoding import SamplingParams, generate_chat

        if not conversations:
            return []
        if temperature and temperature > 0:
            params = SamplingParams(strategy="sample", max_new_tokens=max_tokens,
                                    temperature=temperature, n=1, seed=self.seed)
        else:
            params = SamplingParams(strategy="greedy", max_new_tokens=max_tokens, n=1)
        # Prompts longer than the model's context keep their end, where the output format is.
        limit = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        max_prompt = max(1, int(limit) - max_tokens) if isinstance(limit, int) else None
        outs = generate_chat(self.model, self.tokenizer, [list(c) for c in conversations], params,
                             batch_size=self.batch_size, max_prompt_length=max_prompt)
        return [o[0] if o else "" for o in outs]

    def close(self) -> None:
        self.model = None
        self.tokenizer = None
