"""EleutherAI's lm-evaluation-harness against ``rlhfkit serve``: its ``local-completions`` model (with
its defaults: token-id prompts, echo + logprobs=1 + max_tokens=1 for log-likelihoods; stop strings,
seed and temperature 0 for generations) gives the same per-sample log-likelihoods (within 1e-3)
and the same greedy generations as its own ``hf`` model on the same checkpoint.

A tiny local task (YAML + JSONL written here) and a tiny random model: no network.
"""

import json
import textwrap

import pytest

REASON = "lm-eval is the optional extra `bench` (pip install 'rlhfkit[bench]')"
lm_eval = pytest.importorskip("lm_eval", reason=REASON)
pytest.importorskip("tenacity", reason=REASON + "; its local-completions model needs lm-eval's `api` extra")

MC_DOCS = [
    {"question": "What colour is the sky?", "choices": ["blue", "green", "loud"], "answer": 0},
    {"question": "How many legs has a cat?", "choices": ["two", "four", "seven"], "answer": 1},
    {"question": "Which is a fruit?", "choices": ["stone", "chair", "apple"], "answer": 2},
    {"question": "Water freezes at", "choices": ["zero degrees", "ninety degrees", "noon"], "answer": 0},
]
GEN_DOCS = [
    {"prompt": "Once upon a time", "target": "there"},
    {"prompt": "Q: What is 2+2?\nA:", "target": "4"},
    {"prompt": "The list: a, b, c,", "target": "d"},
]


def _write_tasks(folder) -> None:
    data = folder / "data"
    data.mkdir()
    for name, docs in (("mc", MC_DOCS), ("gen", GEN_DOCS)):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    common = f"""\
        dataset_path: json
        dataset_kwargs:
          cache_dir: {folder / "hf-datasets-cache"}
          data_files:
            test: {{path}}
        test_split: test
        """
    (folder / "rk_mc.yaml").write_text(textwrap.dedent(common).format(path=data / "mc.jsonl") + textwrap.dedent("""\
        task: rk_mc
        output_type: multiple_choice
        doc_to_text: "Question: {{question}}\\nAnswer:"
        doc_to_choice: "{{choices}}"
        doc_to_target: "{{answer}}"
        metric_list:
          - metric: acc
        """))
    (folder / "rk_gen.yaml").write_text(textwrap.dedent(common).format(path=data / "gen.jsonl") + textwrap.dedent("""\
        task: rk_gen
        output_type: generate_until
        doc_to_text: "{{prompt}}"
        doc_to_target: "{{target}}"
        generation_kwargs:
          until: ["\\n\\n", "p", "a"]  # the tiny model writes "p" and "a" in two of the three answers
          max_gen_toks: 12
          do_sample: false
          temperature: 0
        metric_list:
          - metric: exact_match
        """))


def _run(model: str, model_args: dict, task_dir) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    results = simple_evaluate(model=model, model_args=model_args, tasks=["rk_mc", "rk_gen"],
                              task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
                              batch_size=1, device="cpu", log_samples=True, bootstrap_iters=0)
    return results["samples"]


def _loglikelihoods(samples: dict) -> list[float]:
    return [resp[0][0] for doc in sorted(samples["rk_mc"], key=lambda s: s["doc_id"]) for resp in doc["resps"]]


def _generations(samples: dict) -> list[str]:
    return [doc["resps"][0][0] for doc in sorted(samples["rk_gen"], key=lambda s: s["doc_id"])]


def test_local_completions_matches_hf(tmp_path, tiny_path, monkeypatch):
    from rlhfkit.serve.server import start_background

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _write_tasks(tmp_path)
    hf = _run("hf", {"pretrained": tiny_path, "dtype": "float32"}, tmp_path)
    with start_background(tiny_path, served_model_name="tiny") as server:
        served = _run("local-completions", {"model": "tiny", "base_url": server.base_url + "/completions",
                                            "tokenizer": tiny_path}, tmp_path)
        stats = server.engine.stats()
    assert stats["failed_calls"] == 0 and stats["requests"] >= 12 + 3

    expected = _loglikelihoods(hf)
    assert len(expected) == sum(len(d["choices"]) for d in MC_DOCS)
    assert len(set(expected)) > 1  # the numbers differ, so agreeing means something
    assert _loglikelihoods(served) == pytest.approx(expected, abs=1e-3)

    generations = _generations(hf)
    assert any(generations)  # the tiny model says something
    assert _generations(served) == generations
