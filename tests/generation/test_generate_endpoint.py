"""rlhfkit generate --model-url: distilling completions from an OpenAI-compatible endpoint into the same
records as local generation, the request fields sent, flags an endpoint cannot honour refused, best-of-N
scoring, and resuming after an endpoint error without repeating a request."""

from __future__ import annotations

import json

import pytest

from core_helpers import write_jsonl
from scripted_endpoint import ScriptedEndpoint

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [{"prompt": "hello", "id": 1},
           {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi there"}],
            "id": 2}]


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def prompts(tmp_path):
    return write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)


def counting(fail_on: str = ""):
    """Replies ``<last user message> #<k>``, k counting that message's requests."""
    seen: dict[str, int] = {}

    def respond(body):
        text = body["messages"][-1]["content"]
        if fail_on and fail_on in text:
            return 403, {"error": {"message": "quota exceeded"}}
        seen[text] = seen.get(text, 0) + 1
        return f"{text} #{seen[text]}"
    return respond


def test_endpoint_records_have_the_local_format(run_cli, prompts, tiny_lm, tmp_path):
    local, remote = tmp_path / "local.jsonl", tmp_path / "remote.jsonl"
    assert run_cli("generate", "--model", tiny_lm, "--prompts", prompts, "--output", local,
                   "--samples-per-prompt", "2", "--max-new-tokens", "4").code == 0
    with ScriptedEndpoint(counting()) as ep:
        result = run_cli("generate", "--model-url", ep.url, "--model-name", "teacher", "--prompts", prompts,
                         "--output", remote, "--samples-per-prompt", "2", "--temperature", "0.7", "--top-p", "0.9",
                         "--max-new-tokens", "20", "--stop", "###", "--concurrency", "1")
        bodies = ep.seen
    assert result.code == 0, result.err
    assert "generate: 4 completions for 2 prompts" in result.out
    local_rows, rows = read(local), read(remote)
    assert [sorted(r) for r in rows] == [sorted(r) for r in local_rows]
    assert [{k: v for k, v in r.items() if k != "completions"} for r in rows] == PROMPTS
    assert [sorted(r["completions"]) for r in rows] == [["hello #1", "hello #2"], ["hi there #1", "hi there #2"]]
    hello = [{"role": "user", "content": "hello"}]
    assert [b["messages"] for b in bodies] == [hello, hello, PROMPTS[1]["messages"], PROMPTS[1]["messages"]]
    assert {(b["model"], b["temperature"], b["top_p"], b["max_tokens"], tuple(b["stop"])) for b in bodies} == {
        ("teacher", 0.7, 0.9, 20, ("###",))}
    assert all("seed" not in b and "n" not in b and "top_k" not in b for b in bodies)


def test_greedy_asks_once_per_prompt_at_temperature_0(run_cli, prompts, tmp_path):
    with ScriptedEndpoint(counting()) as ep:
        result = run_cli("generate", "--model-url", ep.url, "--model-name", "m", "--prompts", prompts,
                         "--output", tmp_path / "o.jsonl", "--strategy", "greedy", "--samples-per-prompt", "3")
        assert len(ep.seen) == 2 and {b["temperature"] for b in ep.seen} == {0.0}
        assert all("top_p" not in b and "stop" not in b for b in ep.seen)
    assert result.code == 0, result.err
    assert [r["completions"] for r in read(tmp_path / "o.jsonl")] == [["hello #1"] * 3, ["hi there #1"] * 3]


def test_best_of_n_scores_endpoint_completions(run_cli, prompts, tmp_path):
    reward = tmp_path / "reward.py"
    reward.write_text("def by_number(prompts, completions):\n"
                      "    return [-abs(int(c.rsplit('#', 1)[1]) - 2) for c in completions]\n")
    with ScriptedEndpoint(counting()) as ep:
        result = run_cli("generate", "--model-url", ep.url, "--model-name", "m", "--prompts", prompts,
                         "--output", tmp_path / "o.jsonl", "--best-of", "3", "--reward", f"{reward}:by_number",
                         "--concurrency", "1")
    assert result.code == 0, result.err
    rows = read(tmp_path / "o.jsonl")
    assert [r["best"] for r in rows] == ["hello #2", "hi there #2"]
    assert [sorted(r["scores"]) for r in rows] == [[-1.0, -1.0, 0.0]] * 2


@pytest.mark.parametrize("flags, message", [
    (["--top-k", "5"], "--top-k applies to a local model only (OpenAI's API has no such field); leave it at 0"),
    (["--min-p", "0.1"], "--min-p applies to a local model only"),
    (["--repetition-penalty", "1.2"], "--repetition-penalty applies to a local model only"),
    (["--max-prompt-length", "64"], "--max-prompt-length applies to a local model only"),
    (["--strategy", "beam"], "--strategy beam needs a local model"),
    (["--stop", "a", "b", "c", "d", "e"], "--stop: an endpoint takes at most 4 stop strings"),
    ([], "--model-url needs --model-name"),
])
def test_flags_an_endpoint_cannot_honour_exit_2(run_cli, prompts, tmp_path, no_model_loading, flags, message):
    name = [] if not flags else ["--model-name", "m"]
    result = run_cli("generate", "--model-url", "http://127.0.0.1:9/v1", *name, "--prompts", prompts,
                     "--output", tmp_path / "o.jsonl", *flags)
    assert result.code == 2
    assert any(message in e for e in result.errors), result.errors
    assert not (tmp_path / "o.jsonl").exists() and no_model_loading == []


def test_an_endpoint_error_keeps_finished_prompts_and_a_rerun_sends_only_the_rest(run_cli, prompts, tmp_path):
    out = tmp_path / "o.jsonl"
    flags = ["--prompts", prompts, "--output", out, "--samples-per-prompt", "2", "--concurrency", "1"]
    with ScriptedEndpoint(counting(fail_on="hi there")) as ep:
        ep_flags = ["--model-url", ep.url, "--model-name", "m", *flags]
        first = run_cli("generate", *ep_flags)
        assert first.code == 1
        assert first.err.count("\n") == 1 and "error: model endpoint http://127.0.0.1:" in first.err
        assert "HTTP 403: quota exceeded" in first.err and "1 of 2 prompts" in first.err
        assert [r["completions"] for r in read(out)] == [["hello #1", "hello #2"]]
        assert out.with_suffix(".requests.jsonl").exists()

        ep.respond = counting()
        ep.seen.clear()
        second = run_cli("generate", *ep_flags)
        assert second.code == 0, second.err
        assert [b["messages"][-1]["content"] for b in ep.seen] == ["hi there", "hi there"]
        assert [r["completions"] for r in read(out)] == [["hello #1", "hello #2"], ["hi there #1", "hi there #2"]]

        ep.seen.clear()
        assert run_cli("generate", *ep_flags).code == 0
        assert ep.seen == []


def test_sampling_fields_are_for_an_endpoint_only():
    from rlhfkit.models.backends import OpenAIChatBackend, make_backend

    backend = make_backend("unused", "http://127.0.0.1:9/v1", "m", "NO_SUCH_KEY", role="model",
                           sampling={"top_p": 0.5})
    assert isinstance(backend, OpenAIChatBackend)
    assert backend._payload([{"role": "user", "content": "q"}], 0.7, 8, 0) == {
        "model": "m", "messages": [{"role": "user", "content": "q"}], "temperature": 0.7, "max_tokens": 8,
        "top_p": 0.5}
    with pytest.raises(ValueError, match="a local model takes none"):
        make_backend("unused", "", "", "NO_SUCH_KEY", role="model", sampling={"top_p": 0.5})
