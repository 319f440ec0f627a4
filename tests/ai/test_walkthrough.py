"""docs/ai_feedback.md's walkthrough, run as written on a tiny model with scripted endpoints:
cai-revise → sft → generate → ai-label → rm → ppo, each command reading the last one's output as it is."""

from __future__ import annotations

import json

import pytest

from core_helpers import read_metrics, write_jsonl
from scripted_endpoint import ScriptedEndpoint, pairwise_shown

pytestmark = pytest.mark.usefixtures("one_thread")


def reviser(body) -> str:
    """Answers, critiques and revises: the revision is what SL-CAI trains on."""
    last = body["messages"][-1]["content"]
    if last.startswith("Identify"):
        return "The response could be kinder."
    if last.startswith("Please rewrite"):
        return "Revision: A kind and careful answer."
    return "A first answer."


def judge(body) -> str:
    """Prefers the longer reply whichever side it is shown on (a consistent judge)."""
    a, b, _ = pairwise_shown(body)
    return "[[A]]" if len(a) > len(b) else "[[B]]" if len(b) > len(a) else "[[C]]"


def test_the_walkthrough_runs_end_to_end(run_cli, tiny_lm, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"How do I do thing {i}?"} for i in range(6)])
    with ScriptedEndpoint(reviser) as model, ScriptedEndpoint(judge) as judge_endpoint:
        steps = [
            ("cai-revise", "--prompts", prompts, "--model-url", model.url, "--model-name", "m", "--rounds", "1",
             "--output", tmp_path / "cai"),
            ("sft", "--model", tiny_lm, "--data", tmp_path / "cai" / "sft.jsonl", "--max-steps", "2",
             "--output", tmp_path / "sl-cai", "--no-progress"),
            ("generate", "--model", tmp_path / "sl-cai", "--prompts", prompts, "--samples-per-prompt", "2",
             "--max-new-tokens", "12", "--output", tmp_path / "replies.jsonl"),
            ("ai-label", "--data", tmp_path / "replies.jsonl", "--judge-url", judge_endpoint.url,
             "--judge-model", "judge", "--output", tmp_path / "labels"),
            ("rm", "--model", tiny_lm, "--data", tmp_path / "labels" / "preferences.jsonl", "--max-steps", "2",
             "--output", tmp_path / "rm", "--no-progress"),
            ("ppo", "--model", tmp_path / "sl-cai", "--reward", tmp_path / "rm", "--prompts", prompts,
             "--max-steps", "1", "--batch-size", "2", "--max-new-tokens", "8", "--output", tmp_path / "ppo",
             "--no-progress"),
        ]
        for step in steps:
            result = run_cli(*step)
            assert result.code == 0, (step[0], result.err[-2000:])
    revised = [json.loads(line) for line in (tmp_path / "cai" / "sft.jsonl").read_text().splitlines()]
    assert len(revised) == 6 and revised[0]["messages"][-1]["content"] == "A kind and careful answer."
    labels = [json.loads(line) for line in (tmp_path / "labels" / "preferences.jsonl").read_text().splitlines()]
    assert labels and all(len(row["chosen"]) > len(row["rejected"]) for row in labels)
    assert [row["step"] for row in read_metrics(tmp_path / "ppo")] == [1]
