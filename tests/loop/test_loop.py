"""``rlhfkit loop`` through the real CLI on a tiny model: two rounds offline with a reward function,
resume after an interrupted phase, the human-labelling stop and resume, bad plans."""

from __future__ import annotations

import json

import pytest
import yaml

from core_helpers import TOY_REWARDS, load_params, max_param_diff, write_jsonl, write_text

pytestmark = pytest.mark.usefixtures("one_thread")

@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("loop-inputs")
    return {"reward": write_text(folder / "reward.py", TOY_REWARDS) + ":lower",
            "prompts": write_jsonl(folder / "prompts.jsonl", [{"prompt": f"say something {i}"} for i in range(6)]),
            "eval_prompts": write_jsonl(folder / "heldout.jsonl", [{"prompt": f"tell me {i}"} for i in range(4)])}


def make_plan(folder, tiny_lm, inputs, **changes) -> str:
    plan = {"model": tiny_lm, "prompts": inputs["prompts"], "eval_prompts": inputs["eval_prompts"], "rounds": 2,
            "seed": 3,
            "sample": {"samples_per_prompt": 3, "max_new_tokens": 8, "temperature": 1.0},
            "label": {"source": "reward", "reward": inputs["reward"]},
            "reward_model": {"options": {"model": tiny_lm, "max_steps": 2, "batch_size": 4, "lr": 1e-3,
                                         "progress": False}},
            "optimise": {"method": "dpo", "options": {"max_steps": 2, "batch_size": 4, "lr": 1e-3, "max_length": 64,
                                                      "progress": False}},
            "evaluate": {"baseline_samples": 2, "max_new_tokens": 8, "temperature": 1.0}}
    for key, value in changes.items():
        section, _, name = key.partition("__")
        if name:
            plan[section] = {**plan[section], name: value}
        else:
            plan[section] = value
    return write_text(folder / "plan.yaml", yaml.safe_dump(plan))


@pytest.fixture(scope="module")
def finished_loop(one_thread, tiny_lm, inputs, tmp_path_factory):
    from rlhfkit.cli import main

    folder = tmp_path_factory.mktemp("loop")
    out = folder / "out"
    assert main(["loop", "--plan", make_plan(folder, tiny_lm, inputs), "--output", str(out)]) == 0
    return out


def test_two_rounds_offline_with_a_reward_function(finished_loop, tiny_lm, inputs):
    out = finished_loop
    report = json.loads((out / "report.json").read_text())
    assert [p["round"] for p in report["points"]] == [1, 2]
    assert report["baseline"]["win_rate"] == 0.5 and report["baseline"]["kl"] == 0.0
    for p in report["points"]:
        assert 0 <= p["win_rate"] <= 1 and p["kl"] == p["kl"] and p["pairs"] >= 1
    assert report["points"][1]["cumulative_pairs"] == report["points"][0]["pairs"] + report["points"][1]["pairs"]
    assert "| 2 |" in (out / "report.md").read_text()
    for n in (1, 2):
        for phase in ("samples", "pairs", "reward_model", "policy", "eval"):
            assert (out / f"round-{n}" / phase / "done.json").exists()
        # ordinary rlhfkit outputs: generate rows, preference pairs, rm and dpo runs
        rows = [json.loads(line) for line in (out / f"round-{n}" / "samples" / "completions.jsonl").open()]
        assert len(rows) == 6 and all(len(r["completions"]) == 3 and len(r["scores"]) == 3 for r in rows)
        pairs = [json.loads(line) for line in (out / f"round-{n}" / "pairs" / "pairs.jsonl").open()]
        assert all(p["chosen_score"] > p["rejected_score"] for p in pairs)
        assert (out / f"round-{n}" / "reward_model" / "config.json").exists()
        assert (out / f"round-{n}" / "policy" / "metrics.jsonl").exists()
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["model"] == tiny_lm and saved["optimise"]["method"] == "dpo"


def test_round_two_starts_from_round_one_policy(finished_loop, tiny_lm, inputs):
    from rlhfkit.generation import command as generate

    out = finished_loop
    round1, round2 = out / "round-1" / "policy", out / "round-2" / "policy"
    assert yaml.safe_load((round2 / "config.yaml").read_text())["model"] == str(round1)
    assert yaml.safe_load((out / "round-1" / "policy" / "config.yaml").read_text())["model"] == tiny_lm
    initial, first, second = load_params(tiny_lm), load_params(round1), load_params(round2)
    assert max_param_diff(initial, first) > 0 and max_param_diff(first, second) > 0
    # round 2's samples are round 1's policy sampling with seed 3 + 2
    again = out.parent / "again.jsonl"
    generate.main(generate.Config(model=str(round1), prompts=inputs["prompts"], output=str(again),
                                  samples_per_prompt=3, max_new_tokens=8, temperature=1.0, seed=5))
    samples = out / "round-2" / "samples" / "completions.jsonl"
    assert [json.loads(line)["completions"] for line in again.open()] == \
        [json.loads(line)["completions"] for line in samples.open()]


def test_frontier_finds_the_rounds_policies(finished_loop):
    from rlhfkit.evaluation.frontier import run_policies

    assert run_policies(finished_loop) == [(1, str(finished_loop / "round-1" / "policy")),
                                           (2, str(finished_loop / "round-2" / "policy"))]


def report_figures(out) -> dict:
    """report.json without the paths (which name the output folder)."""
    report = json.loads((out / "report.json").read_text())
    return {"baseline": {k: v for k, v in report["baseline"].items() if k != "policy"},
            "points": [{k: v for k, v in p.items() if k != "policy"} for p in report["points"]]}


def count_phases(monkeypatch) -> dict:
    """Wrap every phase function: how often each runs, and the --resume each training recipe got."""
    from rlhfkit.loop import phases

    calls = {"resumed": []}
    for name in ("baseline", "sample", "label", "reward_model", "optimise", "evaluate"):
        def counted(*args, _name=name, _real=getattr(phases, name)):
            calls[_name] = calls.get(_name, 0) + 1
            return _real(*args)
        monkeypatch.setattr(phases, name, counted)
    real_recipe = phases.run_recipe

    def recipe(module, cfg):
        calls["resumed"].append((module.rsplit(".", 1)[-1], cfg.resume))
        return real_recipe(module, cfg)
    monkeypatch.setattr(phases, "run_recipe", recipe)
    return calls


def test_resume_after_a_crash_redoes_nothing_finished(finished_loop, run_cli, tiny_lm, inputs, tmp_path,
                                                      monkeypatch):
    from rlhfkit.loop import phases

    plan, out = make_plan(tmp_path, tiny_lm, inputs), tmp_path / "out"
    real_recipe = phases.run_recipe

    def crash_in_round_two(module, cfg):
        if module.endswith(".dpo") and "round-2" in cfg.output:
            raise RuntimeError("simulated crash")
        return real_recipe(module, cfg)

    with monkeypatch.context() as m:
        m.setattr(phases, "run_recipe", crash_in_round_two)
        with pytest.raises(RuntimeError, match="simulated crash"):
            run_cli("loop", "--plan", plan, "--output", out)
    assert (out / "round-2" / "reward_model" / "done.json").exists()
    assert not (out / "round-2" / "policy" / "done.json").exists() and not (out / "report.json").exists()

    again = run_cli("loop", "--plan", plan, "--output", out)  # without --resume: refused
    assert again.code == 2 and "--resume" in again.err

    calls = count_phases(monkeypatch)
    result = run_cli("loop", "--plan", plan, "--output", out, "--resume")
    assert result.code == 0, result.err
    assert calls == {"optimise": 1, "evaluate": 1, "resumed": [("dpo", True)]}
    assert report_figures(out) == report_figures(finished_loop)

    # a phase's marker removed: that phase and every later one run again, nothing before it
    (out / "round-2" / "policy" / "done.json").unlink()
    calls.clear()
    calls["resumed"] = []
    assert run_cli("loop", "--plan", plan, "--output", out, "--resume").code == 0
    assert calls == {"optimise": 1, "evaluate": 1, "resumed": [("dpo", True)]}
    assert report_figures(out) == report_figures(finished_loop)

    # a plan with one more round continues the finished loop; any other change is refused
    changed = run_cli("loop", "--plan", make_plan(tmp_path, tiny_lm, inputs, rounds=3, seed=4), "--output", out,
                      "--resume")
    assert changed.code == 2 and "the plan differs from the loop's" in changed.err and "(seed)" in changed.err
    calls.clear()
    calls["resumed"] = []
    assert run_cli("loop", "--plan", make_plan(tmp_path, tiny_lm, inputs, rounds=3), "--output", out,
                   "--resume").code == 0
    assert calls == {"sample": 1, "label": 1, "reward_model": 1, "optimise": 1, "evaluate": 1,
                     "resumed": [("rm", False), ("dpo", False)]}
    three = report_figures(out)
    assert three["points"][:2] == report_figures(finished_loop)["points"] and len(three["points"]) == 3
    assert yaml.safe_load((out / "round-3" / "policy" / "config.yaml").read_text())["model"] == \
        str(out / "round-2" / "policy")


def test_people_label_the_pairs_then_the_loop_resumes(run_cli, tiny_lm, inputs, tmp_path):
    from rlhfkit.label.importer import read_pairs

    plan = make_plan(tmp_path, tiny_lm, inputs, rounds=1, label={"source": "human"},
                     evaluate__reward=inputs["reward"])
    out = tmp_path / "out"
    first = run_cli("loop", "--plan", plan, "--output", out)
    assert first.code == 0, first.err
    to_label = out / "round-1" / "pairs" / "to_label.jsonl"
    judgments = out / "round-1" / "pairs" / "judgments.jsonl"
    assert f"rlhfkit label import {to_label}" in first.err and f"--output {judgments}" in first.err
    imported = read_pairs(to_label)  # the label app's own reader accepts it
    assert len(imported) >= 2 and all(p.metadata == {"loop_round": 1} for p in imported)
    assert not (out / "round-1" / "pairs" / "done.json").exists() and not (out / "report.json").exists()
    # resumed before the judgments exist: it stops again, at the same place
    assert run_cli("loop", "--plan", plan, "--output", out, "--resume").code == 0
    assert not (out / "report.json").exists()

    # what `rlhfkit label export` writes: one row per judged item (a tie is left out)
    rows = [{"prompt": p.prompt, "chosen": p.response_a, "rejected": p.response_b, "margin": 0.5, "tie": False}
            for p in imported]
    rows[0]["tie"] = True
    write_jsonl(judgments, rows)
    result = run_cli("loop", "--plan", plan, "--output", out, "--resume")
    assert result.code == 0, result.err
    pairs = [json.loads(line) for line in (out / "round-1" / "pairs" / "pairs.jsonl").open()]
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [(r["chosen"], r["rejected"]) for r in rows[1:]]
    report = json.loads((out / "report.json").read_text())
    assert [p["round"] for p in report["points"]] == [1] and report["points"][0]["pairs"] == len(rows) - 1


BAD_PLANS = [
    ({"rounds": 0}, "plan.yaml: rounds: must be >= 1"),
    ({"label__source": "crowd"}, "plan.yaml: label.source: 'crowd' is not one of reward, ai, human"),
    ({"optimise__method": "sft"}, "plan.yaml: optimise.method: 'sft' is not one of dpo, ppo, rejection-sampling"),
    ({"optimise__options": {"lr": -1.0}}, "plan.yaml: optimise.options: --lr must be > 0"),
    ({"optimise__options": {"data": "x.jsonl"}}, "plan.yaml: optimise.options: 'data' is set by the loop"),
    ({"optimise__options": {"betta": 0.1}}, "plan.yaml: optimise.options: unknown option 'betta'"),
    ({"sample": {"samples_per_prompt": 1}}, "plan.yaml: sample: samples_per_prompt must be >= 2"),
    ({"evaluate__limit": "many"}, "plan.yaml: evaluate.limit: expected int, got 'many'"),
    ({"label__reward": "nowhere.py:f"}, "plan.yaml: label.reward nowhere.py:f: no such file: nowhere.py"),
    ({"prompts": "missing.jsonl"}, "plan.yaml: prompts: no such file or directory"),
    ({"round": 2}, "plan.yaml: round: unknown field"),
    ({"evaluate__judge": {"judge_url": "http://127.0.0.1:9/v1"}},
     "plan.yaml: evaluate.judge: --judge-url needs --judge-model"),
    ({"evaluate__judge": {"mode": "single"}}, "plan.yaml: evaluate.judge: 'mode' is set by the loop"),
    ({"optimise": {"method": "ppo"}, "reward_model": {"train": False}},
     "plan.yaml: optimise.reward: reward-model needs reward_model.train"),
]


@pytest.mark.parametrize("changes, message", BAD_PLANS)
def test_a_bad_plan_exits_2_naming_the_field(run_cli, no_model_loading, tiny_lm, inputs, tmp_path, changes, message):
    plan = make_plan(tmp_path, tiny_lm, inputs, **changes)
    result = run_cli("loop", "--plan", plan, "--output", tmp_path / "out")
    assert result.code == 2
    assert any(message in line for line in result.errors), result.err
    assert not (tmp_path / "out").exists() and no_model_loading == []


def test_an_ai_judge_labels_the_pairs(run_cli, tiny_lm, inputs, tmp_path):
    """label.source ai: every pair of a prompt's completions asked of the judge in both orders, as
    `rlhfkit ai-label` asks; the scripted judge prefers the reply the reward function scores higher."""
    from scripted_endpoint import ScriptedEndpoint, pairwise_shown

    def lower(text: str) -> float:
        return sum(ch.islower() and ch.isascii() for ch in text) / max(len(text), 1)

    def judge(body) -> str:
        a, b, _ = pairwise_shown(body)
        return "[[A]]" if lower(a) > lower(b) else "[[B]]" if lower(a) < lower(b) else "[[C]]"

    with ScriptedEndpoint(judge) as ep:
        plan = make_plan(tmp_path, tiny_lm, inputs, rounds=1, evaluate__reward=inputs["reward"],
                         label={"source": "ai", "ai_label": {"judge_url": ep.url, "judge_model": "scripted"}})
        result = run_cli("loop", "--plan", plan, "--output", tmp_path / "out")
    assert result.code == 0, result.err
    pairs = [json.loads(line) for line in (tmp_path / "out" / "round-1" / "pairs" / "pairs.jsonl").open()]
    assert pairs and all(lower(p["chosen"]) > lower(p["rejected"]) for p in pairs)
    asked = {(b["messages"][1]["content"]) for b in ep.seen}
    assert len(ep.seen) == len(asked) >= 2 * len(pairs)  # both orders of every pair, nothing asked twice
    assert (tmp_path / "out" / "round-1" / "pairs" / "ai_label" / "stats.json").exists()


@pytest.mark.parametrize("method, options", [
    ("ppo", {"max_steps": 2, "batch_size": 4, "max_new_tokens": 8, "progress": False}),
    ("rejection-sampling", {"samples_per_prompt": 2, "max_new_tokens": 8, "max_steps": 1, "batch_size": 4,
                            "progress": False}),
])
def test_ppo_and_rejection_sampling_optimise_against_the_rounds_reward_model(run_cli, tiny_lm, inputs, tmp_path,
                                                                            method, options):
    plan = make_plan(tmp_path, tiny_lm, inputs, rounds=1, optimise={"method": method, "options": options})
    result = run_cli("loop", "--plan", plan, "--output", tmp_path / "out")
    assert result.code == 0, result.err
    run_config = yaml.safe_load((tmp_path / "out" / "round-1" / "policy" / "config.yaml").read_text())
    assert run_config["reward"] == [str(tmp_path / "out" / "round-1" / "reward_model")]
    assert run_config["model"] == tiny_lm
    policy = json.loads((tmp_path / "out" / "round-1" / "policy" / "done.json").read_text())["path"]
    assert max_param_diff(load_params(tiny_lm), load_params(policy)) > 0
    assert len(json.loads((tmp_path / "out" / "report.json").read_text())["points"]) == 1


def test_a_judge_also_measures_the_win_rate_over_round_0(run_cli, tiny_lm, inputs, tmp_path):
    """evaluate.judge: `rlhfkit judge --mode winrate` on each held-out reply against round 0's first
    reply; a scripted judge that prefers the reply with more lower-case letters gives the win rate
    worked out from the replies themselves."""
    from rlhfkit.evaluation.judging.prompts import quote
    from scripted_endpoint import ScriptedEndpoint

    def lower(text: str) -> float:
        return sum(ch.islower() and ch.isascii() for ch in text) / max(len(text), 1)

    def judge(body) -> str:
        shown = body["messages"][-1]["content"]
        a = shown.split("[Assistant A's answer]\n")[1].split("\n[End of assistant A's answer]")[0]
        b = shown.split("[Assistant B's answer]\n")[1].split("\n[End of assistant B's answer]")[0]
        return "[[A]]" if lower(a) > lower(b) else "[[B]]" if lower(a) < lower(b) else "[[C]]"

    with ScriptedEndpoint(judge) as ep:
        plan = make_plan(tmp_path, tiny_lm, inputs, rounds=1,
                         evaluate__judge={"judge_url": ep.url, "judge_model": "scripted"})
        result = run_cli("loop", "--plan", plan, "--output", tmp_path / "out")
    assert result.code == 0, result.err
    out = tmp_path / "out"
    round0 = [json.loads(line)["reply"] for line in (out / "round-0" / "eval" / "replies.jsonl").open()][::2]
    replies = [json.loads(line)["reply"] for line in (out / "round-1" / "eval" / "replies.jsonl").open()]
    shown = [(lower(quote(r)), lower(quote(b))) for r, b in zip(replies, round0)]  # as the judge reads them
    expected = [1.0 if r > b else 0.0 if r < b else 0.5 for r, b in shown]
    point = json.loads((out / "report.json").read_text())["points"][0]
    assert point["judge_win_rate"] == pytest.approx(sum(expected) / len(expected)), (point, expected)
    assert 0 < sum(expected) < len(expected)  # the replies differ both ways: the figure is not a default
    assert "judge's win rate" in (out / "report.md").read_text()


def test_scored_pairs_by_hand():
    from rlhfkit.loop.phases import scored_pairs

    rows = [{"prompt": "p", "completions": ["a", "b", "c", "a"], "scores": [0.9, 0.1, 0.85, 0.9]},
            {"messages": [{"role": "user", "content": "q"}], "completions": ["x", "y"], "scores": [0.5, 0.5]}]

    def shown(pairs):
        return [(p["chosen"], p["rejected"]) for p in pairs]

    # every two distinct completions (a twice: compared once), ties (x, y) dropped
    assert shown(scored_pairs(rows, "all", 0.0)) == [("a", "b"), ("a", "c"), ("c", "b")]
    assert shown(scored_pairs(rows, "all", 0.1)) == [("a", "b"), ("c", "b")]  # |0.9 - 0.85| <= 0.1
    assert shown(scored_pairs(rows, "best-worst", 0.0)) == [("a", "b")]
    assert scored_pairs(rows, "all", 0.0)[0] == {"prompt": "p", "chosen": "a", "rejected": "b",
                                                 "chosen_score": 0.9, "rejected_score": 0.1}
