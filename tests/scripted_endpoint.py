"""A small scripted OpenAI-compatible endpoint on 127.0.0.1 for tests of anything that talks to a model.

``ScriptedEndpoint(respond)`` serves ``POST /v1/chat/completions``; ``respond(body) -> str | (status, dict)``
returns the reply text (wrapped in an OpenAI chat completion) or a raw status and JSON body. With
``logprobs`` requested, each reply carries per-token log-probs from ``token_logprobs(body, text)`` when
that is given (else the request is answered without them). Every request body is kept in ``seen``.
A scripted pairwise judge reads what it was shown with :func:`pairwise_shown`.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_PAIRWISE_SHOWN = re.compile(r"\[Assistant A's reply\]\n(.*?)\n\[End of assistant A's reply\]\n\n"
                             r"\[Assistant B's reply\]\n(.*?)\n\[End of assistant B's reply\]\n\n"
                             r"The principle:\n(.*?)\n\n", re.S)


def pairwise_shown(body: dict) -> tuple[str, str, str]:
    """(reply shown as A, reply shown as B, principle text) of an ai-label judge request."""
    return _PAIRWISE_SHOWN.search(body["messages"][1]["content"]).groups()


def chat_completion(model: str, content: str, logprobs: list | None = None) -> dict:
    choice = {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}
    if logprobs is not None:
        choice["logprobs"] = {"content": logprobs}
    return {"id": "chatcmpl-scripted", "object": "chat.completion", "model": model, "choices": [choice]}


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):  # noqa: N802 (http.server's naming)
        endpoint: ScriptedEndpoint = self.server.endpoint
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with endpoint.lock:
            endpoint.seen.append(body)
            endpoint.headers.append(dict(self.headers))
        if self.path != "/v1/chat/completions":
            return self._send(404, {"error": {"message": f"no route {self.path}"}})
        answer = endpoint.respond(body)
        if isinstance(answer, tuple):
            return self._send(*answer)
        logprobs = None
        if body.get("logprobs") and endpoint.token_logprobs is not None:
            logprobs = endpoint.token_logprobs(body, answer)
        self._send(200, chat_completion(body.get("model", ""), answer, logprobs))


class ScriptedEndpoint:
    """Start with ``with ScriptedEndpoint(respond) as ep: ep.url`` (``http://127.0.0.1:PORT/v1``)."""

    def __init__(self, respond: Callable[[dict], str | tuple], token_logprobs: Callable | None = None):
        self.respond = respond
        self.token_logprobs = token_logprobs
        self.seen: list[dict] = []
        self.headers: list[dict] = []
        self.lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.endpoint = self
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __enter__(self) -> ScriptedEndpoint:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
