"""`rlhfkit serve --feedback-db`: chat completions logged, `POST /v1/feedback`, `rlhfkit feedback export`.

The HTTP tests run against a real `python -m rlhfkit serve` process on a tiny random model with a
SQLite database; the store's own concurrency test runs on PostgreSQL too where a server can be
started (the label app's fixture, tests/label/conftest.py).
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
import signal
import subprocess
import sys
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from test_serve_cli import _env  # noqa: I001 - the serve tests' environment for a subprocess

from rlhfkit.cli import main as cli_main
from rlhfkit.data.io import read_records
from rlhfkit.data.schema import load_prompts, load_sft, load_unpaired
from rlhfkit.serve.feedback import FeedbackStore, export_records
from rlhfkit.serve.server import Config

# The label app's PostgreSQL fixtures (a throwaway server, a fresh schema per test), loaded by path:
# tests/label is not a package.
_spec = importlib.util.spec_from_file_location("_label_conftest", Path(__file__).parents[1] / "label" / "conftest.py")
_label_conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_label_conftest)
pg_server = _label_conftest.pg_server

CLIENTS = 20
PER_CLIENT = 3


@pytest.fixture(scope="module")
def served(tiny_path, tmp_path_factory):
    """`rlhfkit serve --feedback-db` in a subprocess: (base url, database path)."""
    db = str(tmp_path_factory.mktemp("feedback") / "feedback.db")
    proc = subprocess.Popen([sys.executable, "-m", "rlhfkit", "serve", "--model", tiny_path, "--port", "0",
                             "--served-model-name", "tiny", "--log-level", "warning", "--threads", "1",
                             "--batch-wait-ms", "20", "--feedback-db", db],
                            stderr=subprocess.PIPE, text=True, env=_env())
    lines, found, url = [], threading.Event(), {}

    def read():
        for line in proc.stderr:
            lines.append(line)
            m = re.search(r"at (http://\S+)/v1", line)
            if m:
                url["base"] = m.group(1)
                found.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert found.wait(180), "".join(lines)
        yield SimpleNamespace(url=url["base"], db=db, lines=lines)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:  # pragma: no cover
            proc.kill()
    assert proc.returncode in (0, 130), "".join(lines)
    assert "Traceback" not in "".join(lines), "".join(lines)


def _chat(http: httpx.Client, url: str, messages: list[dict], stream: bool, **extra) -> tuple[str, list[str]]:
    """One chat completion: (its id, the text of each choice), streamed or not."""
    body = {"model": "tiny", "messages": messages, "max_tokens": 4, "temperature": 1.0, **extra}
    if not stream:
        r = http.post(url + "/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        data = r.json()
        return data["id"], [c["message"]["content"] for c in data["choices"]]
    texts: dict[int, str] = {}
    rid = None
    with http.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            rid = chunk["id"]
            for c in chunk["choices"]:
                texts[c["index"]] = texts.get(c["index"], "") + (c["delta"].get("content") or "")
    return rid, [texts[i] for i in sorted(texts)]


def _rate(http: httpx.Client, url: str, body) -> httpx.Response:
    return http.post(url + "/v1/feedback", json=body) if not isinstance(body, bytes) else \
        http.post(url + "/v1/feedback", content=body, headers={"content-type": "application/json"})


def _client(url: str, k: int) -> dict:
    """One client's session: completions (every other one streamed), a rating of each, a second
    rating of the first, a 404 and a 422. Returns what it did."""
    rng = random.Random(k)
    done = {"replies": {}, "ratings": [], "statuses": Counter()}
    with httpx.Client(timeout=180) as http:
        for j in range(PER_CLIENT):
            messages = [{"role": "user", "content": f"client {k} turn {j}: <script>alert({j})</script>"}]
            rid, texts = _chat(http, url, messages, stream=(k + j) % 2 == 1)
            done["replies"][rid] = (messages, texts[0])
            rating = rng.choice(["up", "down"])
            r = _rate(http, url, {"id": rid, "rating": rating, "comment": f"c{k}.{j}"})
            assert r.status_code == 200, r.text
            done["ratings"].append((rid, rating))
        first = next(iter(done["replies"]))
        assert _rate(http, url, {"id": first, "rating": "up"}).status_code == 200  # a second rating
        done["ratings"].append((first, "up"))
        done["statuses"][_rate(http, url, {"id": f"chatcmpl-nope{k}", "rating": "up"}).status_code] += 1
        done["statuses"][_rate(http, url, {"id": first, "rating": "sideways"}).status_code] += 1
    return done


def test_concurrent_clients_nothing_lost_nothing_twice(served):
    with ThreadPoolExecutor(CLIENTS) as pool:
        sessions = list(pool.map(lambda k: _client(served.url, k), range(CLIENTS)))

    replies = {rid: v for s in sessions for rid, v in s["replies"].items()}
    ratings = [r for s in sessions for r in s["ratings"]]
    assert len(replies) == CLIENTS * PER_CLIENT  # every id distinct
    assert sum((s["statuses"] for s in sessions), Counter()) == {404: CLIENTS, 422: CLIENTS}

    store = FeedbackStore(served.db)
    try:
        counts = store.counts()
        with store.db.reading() as s:
            from sqlalchemy import select

            from rlhfkit.serve.feedback import LoggedCompletion
            rows = s.scalars(select(LoggedCompletion)).all()
        latest = {logged.completion_id: rating.rating for logged, rating in store.latest_ratings()}
    finally:
        store.dispose()
    assert counts["completions"] == len(rows) == len(replies)
    assert counts["ratings"] == len(ratings)
    rated = Counter(r for _, r in ratings)
    assert (counts.get("up", 0), counts.get("down", 0)) == (rated["up"], rated["down"])
    # every reply stored once, as the client received it (streamed ones complete), model text as-is
    assert Counter(r.completion_id for r in rows) == Counter({rid: 1 for rid in replies})
    for r in rows:
        messages, text = replies[r.completion_id]
        assert (r.messages, r.completion, r.model, r.choice_index) == (messages, text, "tiny", 0)
        assert r.sampling["max_new_tokens"] == 4 and r.sampling["temperature"] == 1.0
        assert r.finish_reason in ("stop", "length") and r.created_at > 0
    # the latest rating of each reply is the one that counts
    expected = {}
    for rid, rating in ratings:
        expected[rid] = rating
    assert latest == expected


@pytest.mark.parametrize("body, param, code", [
    ({"rating": "up"}, "id", "missing_required_parameter"),
    ({"id": "x"}, "rating", "missing_required_parameter"),
    ({"id": "x", "rating": "meh"}, "rating", "invalid_type"),
    ({"id": "x", "rating": None}, "rating", "invalid_type"),
    ({"id": 7, "rating": "up"}, "id", "invalid_type"),
    ({"id": "", "rating": "up"}, "id", "invalid_type"),
    ({"id": "x", "rating": "up", "comment": 3}, "comment", "invalid_type"),
    ({"id": "x", "rating": "up", "index": -1}, "index", "invalid_type"),
    ({"id": "x", "rating": "up", "index": "0"}, "index", "invalid_type"),
    (["x", "up"], None, "invalid_body"),
    (b'{"id": "x", "rating": ', None, "invalid_json"),
    (b"", None, "invalid_json"),
])
def test_malformed_feedback_is_422(served, body, param, code):
    with httpx.Client(timeout=60) as http:
        r = _rate(http, served.url, body)
    assert r.status_code == 422, r.text
    assert r.json() == {"error": {"message": r.json()["error"]["message"], "type": "invalid_request_error",
                                  "param": param, "code": code}}


def test_unknown_id_or_choice_is_404_and_n_choices_are_rated_apart(served):
    with httpx.Client(timeout=120) as http:
        r = _rate(http, served.url, {"id": "chatcmpl-doesnotexist", "rating": "down"})
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "completion_not_found" and r.json()["error"]["param"] == "id"
        rid, texts = _chat(http, served.url, [{"role": "user", "content": "two please"}], stream=False, n=2)
        assert len(texts) == 2
        ok = _rate(http, served.url, {"id": rid, "rating": "down", "index": 1, "comment": "second one"})
        assert ok.status_code == 200
        assert {k: ok.json()[k] for k in ("object", "id", "index", "rating", "comment")} == \
            {"object": "feedback", "id": rid, "index": 1, "rating": "down", "comment": "second one"}
        assert _rate(http, served.url, {"id": rid, "rating": "up", "index": 2}).status_code == 404
    store = FeedbackStore(served.db)
    try:
        rated = {(c.completion_id, c.choice_index): (c.completion, r.rating) for c, r in store.latest_ratings()}
    finally:
        store.dispose()
    assert rated[(rid, 1)] == (texts[1], "down") and (rid, 0) not in rated


def test_streamed_reply_stored_once_and_complete(served):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "stream me"}]
    with httpx.Client(timeout=120) as http:
        rid, texts = _chat(http, served.url, messages, stream=True, n=2, max_tokens=6)
        assert _rate(http, served.url, {"id": rid, "rating": "up", "index": 1}).status_code == 200
    store = FeedbackStore(served.db)
    try:
        from sqlalchemy import select

        from rlhfkit.serve.feedback import LoggedCompletion
        with store.db.reading() as s:
            rows = s.scalars(select(LoggedCompletion).where(LoggedCompletion.completion_id == rid)
                             .order_by(LoggedCompletion.choice_index)).all()
    finally:
        store.dispose()
    assert [(r.choice_index, r.completion, r.messages) for r in rows] == [(0, texts[0], messages),
                                                                          (1, texts[1], messages)]


def test_served_feedback_exported_trains_kto(served, tiny_path, tmp_path):
    """serve --feedback-db → POST /v1/feedback → feedback export → rlhfkit kto. At step 1 π = π_ref:
    every log-ratio and z_ref are 0, so each example's loss is λ·(1 − σ(0)) = 1/2 (λ_D = λ_U = 1)."""
    with httpx.Client(timeout=120) as http:
        for k, rating in enumerate(["up", "down", "up", "down"]):
            rid, _ = _chat(http, served.url, [{"role": "user", "content": f"kto {k}"}], stream=k % 2 == 1)
            assert _rate(http, served.url, {"id": rid, "rating": rating}).status_code == 200
    data = tmp_path / "kto.jsonl"
    records = _export(served.db, data, "kto")
    assert {r["label"] for r in records} == {True, False}
    assert all(set(r) == {"prompt", "completion", "label"} for r in records)
    out = tmp_path / "kto"
    assert cli_main(["kto", "--model", tiny_path, "--data", str(data), "--output", str(out), "--batch-size", "4",
                     "--max-steps", "2", "--lr", "1e-3", "--no-progress"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["loss"] == pytest.approx(0.5, abs=1e-6) and rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)


# ------------------------------------------------------------------------------ export
class _Reply:
    def __init__(self, text, finish_reason="stop"):
        self.text, self.finish_reason = text, finish_reason


def _fill(store: FeedbackStore) -> None:
    """Three requests (one asked twice), ratings with a changed mind, and an unrated reply."""
    ask = [{"role": "user", "content": "hello"}]
    conv = [{"role": "system", "content": "s"}, {"role": "user", "content": "2+2?"}]
    store.log_chat("chatcmpl-a", "m", ask, {"temperature": 0.7}, [_Reply("hi <b>there</b>"), _Reply("yo")])
    store.log_chat("chatcmpl-b", "m", conv, {"temperature": 0.7}, [_Reply("4")])
    store.log_chat("chatcmpl-c", "m", ask, {"temperature": 0.7}, [_Reply("{{ 7*7 }}", "length")])
    store.log_chat("chatcmpl-d", "m", [{"role": "user", "content": "unrated"}], {}, [_Reply("x")])
    assert store.rate("chatcmpl-a", 0, "down", None).rating == "down"
    assert store.rate("chatcmpl-a", 0, "up", "changed my mind").rating == "up"   # latest wins: up
    assert store.rate("chatcmpl-a", 1, "down", None).rating == "down"
    assert store.rate("chatcmpl-b", 0, "up", None).rating == "up"
    assert store.rate("chatcmpl-c", 0, "up", None).rating == "up"
    assert store.rate("chatcmpl-c", 0, "down", "on reflection").rating == "down"  # latest wins: down
    assert store.rate("chatcmpl-zzz", 0, "up", None) is None


def _export(db: str, out: Path, fmt: str) -> list[dict]:
    assert cli_main(["feedback", "export", "--db", db, "--output", str(out), "--format", fmt]) == 0
    return [r.data for r in read_records(str(out))]


def test_export_formats_round_trip(tmp_path, tiny_path):
    db = str(tmp_path / "fb.db")
    store = FeedbackStore(db)
    _fill(store)
    store.dispose()
    ask = [{"role": "user", "content": "hello"}]
    conv = [{"role": "system", "content": "s"}, {"role": "user", "content": "2+2?"}]

    kto = _export(db, tmp_path / "kto.jsonl", "kto")
    assert kto == [
        {"prompt": ask, "completion": [{"role": "assistant", "content": "hi <b>there</b>"}], "label": True},
        {"prompt": ask, "completion": [{"role": "assistant", "content": "yo"}], "label": False},
        {"prompt": conv, "completion": [{"role": "assistant", "content": "4"}], "label": True},
        {"prompt": ask, "completion": [{"role": "assistant", "content": "{{ 7*7 }}"}], "label": False},
    ]
    assert [(e.prompt, e.completion[0]["content"], e.desirable) for e in load_unpaired(str(tmp_path / "kto.jsonl"))] \
        == [(ask, "hi <b>there</b>", True), (ask, "yo", False), (conv, "4", True), (ask, "{{ 7*7 }}", False)]
    # what TRL's KTO trainer reads: conversational {prompt, completion} with a bool label
    from transformers import AutoTokenizer
    from trl.data_utils import apply_chat_template, is_conversational

    tok = AutoTokenizer.from_pretrained(tiny_path)
    assert all(is_conversational(r) and isinstance(r["label"], bool) for r in kto)
    templated = apply_chat_template({"prompt": kto[2]["prompt"], "completion": kto[2]["completion"]}, tok)
    assert "2+2?" in templated["prompt"] and templated["completion"].startswith("4")

    sft = _export(db, tmp_path / "sft.jsonl", "sft")
    assert sft == [{"messages": ask + [{"role": "assistant", "content": "hi <b>there</b>"}]},
                   {"messages": conv + [{"role": "assistant", "content": "4"}]}]
    assert [(e.prompt, e.completion) for e in load_sft(str(tmp_path / "sft.jsonl"))] == [
        (ask, [{"role": "assistant", "content": "hi <b>there</b>"}]), (conv, [{"role": "assistant", "content": "4"}])]

    prompts = _export(db, tmp_path / "prompts.jsonl", "prompts")
    assert prompts == [{"prompt": ask}, {"prompt": conv}, {"prompt": [{"role": "user", "content": "unrated"}]}]
    assert [e.prompt for e in load_prompts(str(tmp_path / "prompts.jsonl"))] == [p["prompt"] for p in prompts]


def test_export_and_serve_flags_refuse_bad_databases(tmp_path, capsys):
    assert cli_main(["feedback", "export", "--db", str(tmp_path / "missing.db"), "--output",
                     str(tmp_path / "o.jsonl")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert not (tmp_path / "missing.db").exists()
    with pytest.raises(SystemExit) as e:
        cli_main(["feedback", "export", "--db", str(tmp_path / "x.db"), "--format", "dpo"])
    assert e.value.code == 2
    problems = Config(feedback_db=str(tmp_path / "no" / "dir" / "f.db")).validate()
    assert problems == [f"--feedback-db: the folder {tmp_path / 'no' / 'dir'} does not exist"]


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return str(tmp_path / "fb.db")
    return _label_conftest._new_pg_database(request.getfixturevalue("pg_server"))


def test_store_concurrent_writers(store_url):
    """20 threads logging and rating at once through one store (the server's pool of connections)."""
    store = FeedbackStore(store_url)

    def work(k: int) -> list[str]:
        out = []
        for j in range(5):
            rid = f"chatcmpl-{k}-{j}"
            store.log_chat(rid, "m", [{"role": "user", "content": f"{k}/{j}"}], {"n": 2},
                           [_Reply(f"a{k}{j}"), _Reply(f"b{k}{j}")])
            for index in (0, 1):
                rating = "up" if (k + j + index) % 3 else "down"
                assert store.rate(rid, index, rating, None).rating == rating
                out.append(rating)
        return out

    try:
        with ThreadPoolExecutor(CLIENTS) as pool:
            done = [r for rs in pool.map(work, range(CLIENTS)) for r in rs]
        counts = store.counts()
        kto = list(export_records(store, "kto"))
    finally:
        store.dispose()
    assert counts == {"completions": CLIENTS * 10, "ratings": len(done), "up": done.count("up"),
                      "down": done.count("down")}
    assert len(kto) == CLIENTS * 10 and sum(r["label"] for r in kto) == done.count("up")


def test_a_failing_feedback_log_does_not_fail_the_completion(caplog):
    from rlhfkit.serve.feedback import record_chat

    class Broken:
        def log_chat(self, *args):
            raise RuntimeError("disk full")

    record_chat(Broken(), "chatcmpl-x", "m", [], {}, [])  # logged, not raised
    assert "could not store chat completion chatcmpl-x" in caplog.text
