"""`rlhfkit cai-revise` end to end against a scripted endpoint (and once on a tiny local model).

The scripted model answers a prompt with "RESPONSE to ...", a critique request with
"CRITIQUE n" and a revision request with "Revision: REVISED n" (n counts the requests of one
conversation), so every request can be traced: which principle text it carried, which
conversation came with it, and which labels the revision lost.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from core_helpers import write_jsonl, write_text
from rlhfkit.data.constitution import load_constitution, seeded_principle
from rlhfkit.label.cai_revise import BUILTIN_PROMPTS, strip_revision_label
from scripted_endpoint import ScriptedEndpoint

pytestmark = pytest.mark.usefixtures("one_thread")

PRINCIPLES = [
    {"name": "kind", "critique": "CRIT-KIND: identify ways in which the last response is unkind.",
     "revision": "REV-KIND: please rewrite the response to remove anything unkind.",
     "preference": "Which response is kinder?"},
    {"name": "true", "critique": "CRIT-TRUE: identify ways in which the last response is false.",
     "revision": "REV-TRUE: please rewrite the response to remove anything false.",
     "preference": "Which response is more truthful?"},
    {"name": "safe", "critique": "CRIT-SAFE: identify ways in which the last response is harmful.",
     "revision": "REV-SAFE: please rewrite the response to remove anything harmful.",
     "preference": "Which response is less harmful?"},
]
ASKS = {p[kind]: (p["name"], kind) for p in PRINCIPLES for kind in ("critique", "revision")}
PROMPTS = [{"id": f"p{i}", "category": "test", "prompt": f"question {i}"} for i in range(5)]
SECRET = "sk-cai-secret-0123456789"


def scripted_model(body) -> str:
    messages = body["messages"]
    last = messages[-1]["content"]
    if last not in ASKS:
        return f"RESPONSE to {last}"
    n = len(messages) // 2
    return f"CRITIQUE {n}" if ASKS[last][1] == "critique" else f"Revision: REVISED {n}"


class Model:
    """The scripted endpoint with a switch: after ``fail_after`` answered requests, answer ``failure``."""

    def __init__(self, fail_after: int | None = None, failure=(500, {"error": {"message": "the model fell over"}})):
        self.fail_after, self.failure = fail_after, failure
        self.ok: list[list[dict]] = []  # the messages of every request answered 200
        self._lock = threading.Lock()

    def __call__(self, body):
        with self._lock:
            if self.fail_after is not None and len(self.ok) >= self.fail_after:
                return self.failure
            self.ok.append(body["messages"])
        return scripted_model(body)


@pytest.fixture
def files(tmp_path):
    return {"prompts": write_jsonl(tmp_path / "prompts.jsonl", PROMPTS),
            "constitution": write_jsonl(tmp_path / "constitution.jsonl", PRINCIPLES)}


@pytest.fixture
def no_backoff(monkeypatch):
    monkeypatch.setattr("rlhfkit.models.backends.time.sleep", lambda s: None)


def cai_revise(run_cli, ep, files, out, *extra):
    return run_cli("cai-revise", "--prompts", files["prompts"], "--constitution", files["constitution"],
                   "--output", out, "--model-url", ep.url, "--model-name", "scripted", *extra)


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_chains_carry_the_sampled_principles_verbatim_and_the_growing_conversation(run_cli, files, tmp_path,
                                                                                    monkeypatch):
    monkeypatch.setenv("CAI_TEST_KEY", SECRET)
    model = Model()
    with ScriptedEndpoint(model) as ep:
        result = cai_revise(run_cli, ep, files, tmp_path / "out", "--rounds", "2", "--seed", "3",
                            "--concurrency", "2", "--api-key-env", "CAI_TEST_KEY")
        sent = list(ep.seen)
        first_rows = read_jsonl(tmp_path / "out" / "sft.jsonl")
        assert all({k.lower(): v for k, v in h.items()}["authorization"] == f"Bearer {SECRET}" for h in ep.headers)
        # Done is done: the same command again sends nothing and writes the same chains.
        again = cai_revise(run_cli, ep, files, tmp_path / "out", "--rounds", "2", "--seed", "3",
                           "--api-key-env", "CAI_TEST_KEY")
        assert again.code == 0 and len(ep.seen) == 25 and "(0 requests sent" in again.out
    assert result.code == 0, result.err
    assert "cai-revise: 5/5 prompts revised over 2 round(s) (25 requests sent" in result.out
    principles = load_constitution(files["constitution"])
    expected = [[seeded_principle(principles, 3, i, r) for r in range(2)] for i in range(5)]
    assert len({p.name for row in expected for p in row}) > 1  # the seed spreads the draws

    # Each prompt's five requests: the prompt, then per round the critique and revision texts
    # verbatim, each request carrying every earlier request and its reply.
    assert len(sent) == 25 and all(b["temperature"] == 0.7 and b["max_tokens"] == 256 for b in sent)
    for i in range(5):
        chain = sorted((b["messages"] for b in sent if b["messages"][0]["content"] == f"question {i}"), key=len)
        assert [len(m) for m in chain] == [1, 3, 5, 7, 9]
        asks = [m[-1]["content"] for m in chain[1:]]
        assert asks == [expected[i][0].critique, expected[i][0].revision,
                        expected[i][1].critique, expected[i][1].revision]
        for before, after in zip(chain, chain[1:]):
            assert after[:len(before)] == before
            assert after[len(before)] == {"role": "assistant", "content": scripted_model({"messages": before})}

    rows = read_jsonl(tmp_path / "out" / "sft.jsonl")
    assert [r["id"] for r in rows] == [f"p{i}" for i in range(5)] and rows[0]["category"] == "test"
    for i, row in enumerate(rows):
        assert row["messages"] == [{"role": "user", "content": f"question {i}"},
                                   {"role": "assistant", "content": "REVISED 4"}]  # the label removed
        assert row["initial_response"] == f"RESPONSE to question {i}"
        assert row["chain"] == [{"principle": expected[i][0].name, "critique": "CRITIQUE 1", "revision": "REVISED 2"},
                                {"principle": expected[i][1].name, "critique": "CRITIQUE 3", "revision": "REVISED 4"}]
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    counts = {}
    for row in expected:
        for p in row:
            counts[p.name] = counts.get(p.name, 0) + 1
    assert stats["principles"] == dict(sorted(counts.items()))
    assert (stats["prompts"], stats["rounds"], stats["complete"], stats["requests"]) == \
        (5, 2, 5, {"journal": 25, "sent_this_run": 0})  # the stats of the second run
    assert stats["revision_labels_removed"] == 10 and stats["model"].endswith("(scripted)")
    for path in (tmp_path / "out").iterdir():  # the key is sent, never written
        assert SECRET not in path.read_text(), path
    assert "api_key_env: CAI_TEST_KEY" in (tmp_path / "out" / "config.yaml").read_text()
    assert rows == first_rows  # rewritten identically by the run that had nothing left to do


def test_an_interrupted_run_resumes_without_sending_any_request_twice(run_cli, files, tmp_path, no_backoff):
    model = Model(fail_after=13)  # 5 responses, 5 critiques, 3 revisions; then HTTP 500
    with ScriptedEndpoint(model) as ep:
        first = cai_revise(run_cli, ep, files, tmp_path / "out", "--rounds", "2", "--concurrency", "2")
        answered_first = list(model.ok)
        rows_first = read_jsonl(tmp_path / "out" / "sft.jsonl")
        model.fail_after = None
        second = cai_revise(run_cli, ep, files, tmp_path / "out", "--rounds", "2", "--concurrency", "2")
        answered_second = model.ok[len(answered_first):]
        whole = cai_revise(run_cli, ep, files, tmp_path / "whole", "--rounds", "2")
    assert first.code == 1 and first.err.count("\n") == 1
    assert "error: model endpoint http://127.0.0.1:" in first.err and "HTTP 500: the model fell over" in first.err
    assert "0 of 5 chains finished before it" in first.err  # round 2 had not started
    assert rows_first == []
    assert len(answered_first) == 13
    assert second.code == 0, second.err
    assert len(answered_second) == 25 - 13
    assert not [m for m in answered_second if m in answered_first]  # nothing sent twice
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["requests"] == {"journal": 25, "sent_this_run": 12} and stats["complete"] == 5
    assert read_jsonl(tmp_path / "out" / "sft.jsonl") == read_jsonl(tmp_path / "whole" / "sft.jsonl")
    assert whole.code == 0, whole.err


def test_a_401_ends_with_one_line_and_keeps_the_chains_finished_before(run_cli, files, tmp_path, monkeypatch):
    monkeypatch.setenv("CAI_TEST_KEY", SECRET)
    model = Model(fail_after=12, failure=(401, {"error": {"message": "invalid api key"}}))
    with ScriptedEndpoint(model) as ep:  # 5 responses, 5 critiques, 2 revisions, then 401
        result = cai_revise(run_cli, ep, files, tmp_path / "out", "--concurrency", "1", "--api-key-env",
                            "CAI_TEST_KEY")
    assert result.code == 1 and result.err.count("\n") == 1
    assert "HTTP 401: invalid api key (the API key is read from the environment variable CAI_TEST_KEY)" in result.err
    assert "2 of 5 chains finished before it are in" in result.err
    rows = read_jsonl(tmp_path / "out" / "sft.jsonl")
    assert [r["id"] for r in rows] == ["p0", "p1"]
    assert rows[1]["messages"][-1] == {"role": "assistant", "content": "REVISED 2"}
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert (stats["complete"], stats["unfinished"]) == (2, 3)
    for path in (tmp_path / "out").iterdir():
        assert SECRET not in path.read_text(), path


def test_bad_prompts_and_constitution_exit_2_naming_file_line_and_field(run_cli, files, tmp_path, no_model_loading):
    prompts = write_text(tmp_path / "bad.jsonl", '{"prompt": "fine"}\n{"prompt": ""}\n{"text": "x"}\n')
    with ScriptedEndpoint(scripted_model) as ep:
        result = cai_revise(run_cli, ep, {**files, "prompts": prompts}, tmp_path / "out")
        assert result.code == 2
        assert result.errors == [f"error: {prompts}:2: field 'prompt': is empty",
                                 f"error: {prompts}:3: field 'prompt': missing field"]
        constitution = write_text(tmp_path / "c.yaml", "- name: a\n  critique: c\n  revision: r\n")
        result = cai_revise(run_cli, ep, {**files, "constitution": constitution}, tmp_path / "out")
        assert result.code == 2
        assert result.errors == [f"error: {constitution}:1: field 'preference': expected a non-empty string (missing)"]
        result = cai_revise(run_cli, ep, files, tmp_path / "out", "--rounds", "0")
        assert result.code == 2 and result.errors == ["error: --rounds must be >= 1 (got 0)"]
        assert ep.seen == []
    assert no_model_loading == [] and not (tmp_path / "out").exists()


def test_the_builtin_red_team_prompts_and_constitution_are_the_defaults(run_cli, tmp_path):
    from rlhfkit.data.constitution import builtin_file

    records = read_jsonl(builtin_file(BUILTIN_PROMPTS))
    harmful = [r for r in records if r["category"] != "benign-lookalike"]
    assert len(harmful) >= 30 and len({r["category"] for r in harmful}) >= 8
    assert len({r["id"] for r in records}) == len(records) == len({r["prompt"] for r in records})
    with ScriptedEndpoint(scripted_model) as ep:
        result = run_cli("cai-revise", "--output", tmp_path / "out", "--model-url", ep.url, "--model-name", "m",
                         "--seed", "1")
        builtin = {p.critique for p in load_constitution("builtin")}
        assert sum(b["messages"][-1]["content"] in builtin for b in ep.seen) == len(records)
    assert result.code == 0, result.err
    rows = read_jsonl(tmp_path / "out" / "sft.jsonl")
    assert [(r["id"], r["category"], r["messages"][0]["content"]) for r in rows] == \
        [(r["id"], r["category"], r["prompt"]) for r in records]


def test_sft_trains_on_the_output_as_it_is(run_cli, files, tmp_path, tiny_lm):
    with ScriptedEndpoint(scripted_model) as ep:
        assert cai_revise(run_cli, ep, files, tmp_path / "cai").code == 0
    result = run_cli("sft", "--model", tiny_lm, "--data", tmp_path / "cai" / "sft.jsonl", "--output", tmp_path / "sft",
                     "--max-steps", "2", "--batch-size", "2", "--lr", "1e-2", "--no-progress")
    assert result.code == 0, result.err
    metrics = read_jsonl(tmp_path / "sft" / "metrics.jsonl")
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2]


def test_a_local_tiny_model_revises(run_cli, files, tmp_path, tiny_lm):
    result = run_cli("cai-revise", "--prompts", files["prompts"], "--constitution", files["constitution"],
                     "--output", tmp_path / "out", "--model", tiny_lm, "--max-new-tokens", "6", "--temperature", "1",
                     "--generation-batch-size", "5")
    assert result.code == 0, result.err
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    rows = read_jsonl(tmp_path / "out" / "sft.jsonl")
    assert (stats["complete"], stats["requests"], len(rows)) == (5, {"journal": 15, "sent_this_run": 15}, 5)
    assert stats["model"] == tiny_lm
    for row in rows:
        assert row["messages"][-1]["content"] == row["chain"][0]["revision"] != ""


def test_an_empty_response_or_revision_ends_its_chain(run_cli, files, tmp_path):
    def respond(body):
        prompt, last = body["messages"][0]["content"], body["messages"][-1]["content"]
        asked = ASKS[last][1] if last in ASKS else "response"
        if (prompt, asked) in {("question 1", "response"), ("question 3", "revision")}:
            return "  \n"
        if (prompt, asked) == ("question 2", "revision"):
            return "Revision:"  # a label and nothing else: kept as the text
        return scripted_model(body)

    with ScriptedEndpoint(respond) as ep:
        result = cai_revise(run_cli, ep, files, tmp_path / "out", "--rounds", "2")
        assert len(ep.seen) == 25 - 4 - 2  # question 1 stopped after its response, question 3 after round 1
    assert result.code == 0, result.err
    assert "3/5 prompts revised" in result.out and "2 ended by an empty reply" in result.out
    rows = read_jsonl(tmp_path / "out" / "sft.jsonl")
    assert [r["id"] for r in rows] == ["p0", "p2", "p4"]
    assert rows[1]["messages"][-1]["content"] == "Revision:"
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert (stats["complete"], stats["empty_reply"], stats["unfinished"]) == (3, 2, 0)


@pytest.mark.parametrize("text, expected, removed", [
    ("Revision: Here it is.", "Here it is.", True),
    ("  **Revised response:** Better.\n", "Better.", True),
    ("**Revision**: Better.", "Better.", True),
    ("rewritten response:\n\nLine one.\nLine two.", "Line one.\nLine two.", True),
    ("Revision:", "Revision:", False),             # nothing after the label: the text is kept
    ("My revision: kept as is.", "My revision: kept as is.", False),  # only at the very start
    ("Revisions are hard: yes.", "Revisions are hard: yes.", False),
    ("  plain text  ", "plain text", False),
])
def test_only_a_leading_revision_label_is_removed(text, expected, removed):
    assert strip_revision_label(text) == (expected, removed)
