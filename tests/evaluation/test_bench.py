"""``rlhfkit eval-bench`` (lm-evaluation-harness as a library) and ``eval-frontier --y-bench``.

A multiple-choice task is written by each test (YAML + JSONL, no network); its accuracy is checked
against the tiny model's own log-likelihoods summed over each choice's tokens, computed here with
rlhfkit's token log-prob primitive. The Open LLM Leaderboard suite needs the network: offline it
is one error line and exit 2, before any model is loaded.
"""

from __future__ import annotations

import json
import math
import os
import sys

import pytest

from core_helpers import write_jsonl, write_text

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# question, choices, index of the right one
ITEMS = [("2 + 2", ["4", "5", "22"], 0), ("3 + 4", ["6", "7", "8"], 1), ("the sky", ["green", "blue"], 1),
         ("1 + 1", ["3", "11", "2"], 2), ("ice is", ["cold", "hot", "loud"], 0), ("5 - 3", ["2", "8"], 0),
         ("a cat says", ["woof", "meow", "moo"], 1), ("10 / 2", ["20", "12", "5"], 2),
         ("fire is", ["hot", "wet"], 0), ("9 - 9", ["1", "0", "9"], 1)]

TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: "{{{{label}}}}"
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


# the same items as a loglikelihood task scored by perplexity (continuous: it moves with every update)
LOGLIKELIHOOD_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: " {{{{choices[label]}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
"""


def write_task(folder, name: str = "toy_mc", template: str = TASK_YAML) -> str:
    """A local lm-eval task folder: ``name``.yaml over ``name``.jsonl (ITEMS)."""
    data = write_jsonl(folder / f"{name}.jsonl", [{"question": q, "choices": c, "label": a} for q, c, a in ITEMS])
    write_text(folder / f"{name}.yaml", template.format(name=name, data=data))
    return str(folder)


def answer_logprobs(model_path: str, limit: int = len(ITEMS)) -> list[list[float]]:
    """Per item, log P(" choice" | "Q: question\\nA:") of each choice, as lm-eval's hf model scores
    it: no BOS, the continuation's tokens are those of the whole text after the context's."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhfkit.losses import token_logps

    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    scores = []
    for question, choices, _ in ITEMS[:limit]:
        context = f"Q: {question}\nA:"
        n_context = len(tokenizer(context, add_special_tokens=False).input_ids)
        scores.append([])
        for choice in choices:
            ids = torch.tensor([tokenizer(f"{context} {choice}", add_special_tokens=False).input_ids])
            with torch.no_grad():
                logits = model(ids).logits[0, :-1].float()
            scores[-1].append(float(token_logps(logits, ids[0, 1:])[n_context - 1:].sum()))
    return scores


def hand_accuracy(model_path: str, limit: int = len(ITEMS)) -> float:
    """The share of items whose right choice has the highest log-likelihood."""
    scores = answer_logprobs(model_path, limit)
    return sum(max(range(len(s)), key=s.__getitem__) == answer for s, (_, _, answer) in zip(scores, ITEMS)) / limit


def hand_perplexity(model_path: str) -> float:
    """lm-eval's perplexity of a loglikelihood task: exp(-mean over items of log P(answer | question))."""
    scores = answer_logprobs(model_path)
    return math.exp(-sum(s[answer] for s, (_, _, answer) in zip(scores, ITEMS)) / len(ITEMS))


# ------------------------------------------------------------------------ without lm-eval: the cheap parts


def test_open_llm_suite_has_the_leaderboard_few_shot_counts():
    from rlhfkit.evaluation.bench import task_plan

    plan = task_plan("my_task,hellaswag", "open-llm-v1")
    assert [(t.name, t.num_fewshot) for t in plan] == [
        ("arc_challenge", 25), ("hellaswag", 10), ("mmlu", 5), ("truthfulqa_mc2", 0), ("winogrande", 5),
        ("gsm8k", 5), ("my_task", None)]
    assert plan[0].metric == "acc_norm" and plan[5].metric == "exact_match,strict-match"
    assert {t.num_fewshot for t in task_plan("a,b", "open-llm-v1", num_fewshot=3)} == {3}


def test_task_row_of_a_group_sums_its_leaves_and_takes_the_preferred_metric():
    from rlhfkit.evaluation.bench import BenchTask, task_row

    raw = {"results": {"grp": {"acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.6,
                               "acc_norm_stderr,none": "N/A", "alias": "grp"},
                       "a": {"acc,none": 0.4}, "b": {"acc,none": 0.6}},
           "group_subtasks": {"grp": ["a", "sub"], "sub": ["b"]},
           "n-samples": {"a": {"effective": 3, "original": 9}, "b": {"effective": 4, "original": 4}},
           "n-shot": {"a": 5, "b": 5}}
    row = task_row(raw, BenchTask("grp", "--tasks", 5, "acc_norm"))
    assert row == {"metric": "acc_norm", "filter": "none", "value": 0.6, "stderr": None, "n": 7, "num_fewshot": 5,
                   "metrics": {"acc,none": 0.5, "acc_norm,none": 0.6}}
    assert task_row(raw, BenchTask("a", "--tasks", None))["value"] == 0.4  # no preference: the first metric


def test_completions_url_matches_the_chat_convention():
    from rlhfkit.models.backends import chat_completions_url, completions_url

    for base in ("http://h:8000/v1", "http://h:8000/", "http://h:8000/v1/completions"):
        assert completions_url(base) == "http://h:8000/v1/completions"
    assert chat_completions_url("http://h:8000") == "http://h:8000/v1/chat/completions"


@pytest.mark.parametrize("command", ["eval-bench", "eval-frontier"])
def test_without_lm_eval_the_command_says_how_to_install_it(command, run_cli, no_model_loading, monkeypatch,
                                                            tmp_path):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` fails, find_spec finds nothing
    write_text(tmp_path / "run" / "config.yaml", "model: m\n")
    args = (["--tasks", "x", "--output", tmp_path / "out"] if command == "eval-bench"
            else ["--run", tmp_path / "run", "--y-bench", "x"])
    result = run_cli(command, *args)
    assert result.code == 2
    assert len(result.errors) == 1 and "pip install 'rlhfkit[bench]'" in result.errors[0]
    assert "Traceback" not in result.err and no_model_loading == []


def test_an_endpoint_without_lm_evals_api_extra_says_how_to_install_it(run_cli, monkeypatch, tmp_path):
    pytest.importorskip("lm_eval", reason="lm-eval is the optional [bench] extra")
    monkeypatch.setitem(sys.modules, "tenacity", None)
    result = run_cli("eval-bench", "--model-url", "http://h:1/v1", "--model-name", "m", "--tasks", "x",
                     "--output", tmp_path / "out")
    assert result.code == 2
    assert result.errors == ["error: --model-url: lm-eval's endpoint models need tenacity (lm-eval's `api` extra): "
                             "pip install 'rlhfkit[bench]'"]


# ------------------------------------------------------------------------ with lm-eval


def test_eval_bench_on_a_local_task_equals_the_hand_computed_accuracy(run_cli, one_thread, tiny_lm, tmp_path):
    pytest.importorskip("lm_eval", reason="lm-eval is the optional [bench] extra")
    tasks = write_task(tmp_path / "tasks")
    out = tmp_path / "out"
    result = run_cli("eval-bench", "--model", tiny_lm, "--tasks", "toy_mc", "--include-path", tasks,
                     "--limit", 8, "--batch-size", 4, "--output", out)
    assert result.code == 0, result.err
    data = json.loads((out / "results.json").read_text())
    row = data["tasks"]["toy_mc"]
    assert set(row) == {"metric", "filter", "value", "stderr", "n", "num_fewshot", "metrics"}
    expected = hand_accuracy(tiny_lm, limit=8)
    assert 0 < expected < 1, "the tiny model should get some items right and some wrong"
    assert row["metric"] == "acc" and row["n"] == 8 and row["num_fewshot"] == 0
    assert row["value"] == pytest.approx(expected)
    # the standard error of a mean of 0/1 outcomes: sample standard deviation / sqrt(n)
    assert row["stderr"] == pytest.approx(math.sqrt(expected * (1 - expected) * 8 / 7 / 8))
    assert data["lm_eval_version"] == "0.4.13"
    assert data["config"]["tasks"] == "toy_mc" and data["config"]["limit"] == 8
    assert (out / "config.yaml").exists()
    report = (out / "report.md").read_text()
    assert "| toy\\_mc | acc |" in report and f"{expected:.4f}" in report


def test_open_llm_suite_offline_is_one_error_line(run_cli, no_model_loading, monkeypatch, tmp_path):
    pytest.importorskip("lm_eval", reason="lm-eval is the optional [bench] extra")
    import datasets.config
    import huggingface_hub.constants

    for module in (datasets.config, huggingface_hub.constants):  # no network here, nor in CI: fail at once
        monkeypatch.setattr(module, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    out = tmp_path / "out"
    result = run_cli("eval-bench", "--model", "smollm2-135m", "--suite", "open-llm-v1", "--output", out)
    assert result.code == 2
    assert len(result.errors) == 1, result.err
    assert result.errors[0].startswith("error: --suite open-llm-v1: task arc_challenge: its data could not be "
                                       "fetched (offline?")
    assert "Traceback" not in result.err
    assert no_model_loading == [] and not out.exists()


def test_endpoint_goes_through_local_completions_with_the_key_of_api_key_env(monkeypatch, tiny_lm):
    pytest.importorskip("lm_eval", reason="lm-eval is the optional [bench] extra")
    import lm_eval.models.openai_completions as completions

    from rlhfkit.evaluation.bench import Config, model_under_test

    seen = {}
    monkeypatch.setattr(completions, "LocalCompletionsAPI", lambda **kwargs: seen.update(kwargs) or "lm")
    monkeypatch.setenv("MY_KEY", "sekrit")
    cfg = Config(model_url="http://h:8000/v1", model_name="tiny", tokenizer=tiny_lm, api_key_env="MY_KEY",
                 tasks="x", output="o", batch_size=16, concurrency=2)
    lm, label = model_under_test(cfg)
    assert lm == "lm" and label == "http://h:8000/v1/completions (tiny)"
    assert seen["base_url"] == "http://h:8000/v1/completions" and seen["model"] == "tiny"
    assert seen["tokenizer"] == tiny_lm and seen["tokenizer_backend"] == "huggingface"
    assert seen["header"] == {"Authorization": "Bearer sekrit"}
    assert seen["batch_size"] == 16 and seen["num_concurrent"] == 2


def test_eval_bench_on_rlhfkit_serve_equals_the_local_model(run_cli, one_thread, tiny_lm, tmp_path):
    """The endpoint path (lm-eval's local-completions against `rlhfkit serve`) scores as the local one."""
    pytest.importorskip("lm_eval", reason="lm-eval is the optional [bench] extra")
    pytest.importorskip("tenacity", reason="local-completions needs lm-eval's `api` extra")
    from rlhfkit.serve.server import start_background

    tasks = write_task(tmp_path / "tasks")
    with start_background(tiny_lm, served_model_name="tiny") as server:
        result = run_cli("eval-bench", "--model-url", server.base_url, "--model-name", "tiny", "--tokenizer", tiny_lm,
                         "--tasks", "toy_mc", "--include-path", tasks, "--output", tmp_path / "served")
    assert result.code == 0, result.err
    served = json.loads((tmp_path / "served" / "results.json").read_text())
    assert served["model"] == f"{server.base_url}/completions (tiny)"
    assert served["tasks"]["toy_mc"]["value"] == pytest.approx(hand_accuracy(tiny_lm))
    assert served["tasks"]["toy_mc"]["n"] == len(ITEMS)


def test_frontier_with_a_bench_task_scores_every_checkpoint(run_cli, one_thread, tiny_lm, tmp_path):
    pytest.importorskip("lm_eval", reason="lm-eval is the optional [bench] extra")
    reward = write_text(tmp_path / "reward.py", "def lower(prompts, completions):\n"
                        "    return [sum(ch.islower() for ch in c) / max(len(c), 1) for c in completions]\n")
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"say something {i}"} for i in range(4)])
    run = tmp_path / "ppo"
    result = run_cli("ppo", "--model", tiny_lm, "--reward", f"{reward}:lower", "--prompts", prompts,
                     "--output", run, "--max-new-tokens", 6, "--no-progress", "--max-steps", 2,
                     "--batch-size", 4, "--save-steps", 1, "--lr", "3e-2", "--seed", 1)
    assert result.code == 0, result.err
    tasks = write_task(tmp_path / "tasks", "toy_ll", LOGLIKELIHOOD_YAML)
    result = run_cli("eval-frontier", "--run", run, "--limit", 4, "--max-new-tokens", 6,
                     "--y-bench", "toy_ll", "--include-path", tasks)
    assert result.code == 0, result.err
    data = json.loads((run / "frontier" / "frontier.json").read_text())
    assert [p["step"] for p in data["points"]] == [0, 1, 2]
    assert data["y_bench"] == "toy_ll perplexity"
    # each checkpoint scored with its own weights: the reference and the last policy, by hand
    first, last = data["points"][0]["bench"], data["points"][2]["bench"]
    assert first == pytest.approx(hand_perplexity(tiny_lm), rel=1e-5)
    assert last == pytest.approx(hand_perplexity(str(run / "policy-2")), rel=1e-5)
    assert abs(first - last) > 1e-3 * first, "two steps of PPO move the perplexity"
    assert (run / "frontier" / "frontier-bench.png").stat().st_size > 1000
    report = (run / "frontier" / "frontier.md").read_text()
    assert "| toy_ll perplexity |" in report and "frontier-bench.png" in report


def test_the_projects_local_task_loads_offline_from_any_directory(monkeypatch, tmp_path):
    """bench/tasks/rlhfkit_basics (the task of the SmolLM2 figure in docs/evaluation.md): 50 items,
    four choices each, the right one cycling through the positions, read relative to its folder."""
    pytest.importorskip("lm_eval", reason="lm-eval is the optional [bench] extra")
    from core_helpers import REPO
    from rlhfkit.evaluation.bench import load_tasks, task_plan

    monkeypatch.chdir(tmp_path)
    (task,) = load_tasks(task_plan("rlhfkit_basics", "none"), str(REPO / "bench" / "tasks")).objects
    docs = list(task.test_docs())
    assert len(docs) == 50 and all(len(d["choices"]) == 4 for d in docs)
    assert [d["label"] for d in docs[:8]] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert {d["kind"] for d in docs} == {"arithmetic", "commonsense"}
