"""lm-eval's ``local-completions`` against ``rlhfkit serve`` vs lm-eval's own ``hf`` model, on one checkpoint.

    .venv/bin/python bench/lm_eval_serve_vs_hf.py [--model smollm2-135m] [--batch-size 4] [--threads 2]

Writes a small local task (multiple-choice questions scored by log-likelihood, and open prompts
answered greedily with stop strings; YAML + JSONL in a temporary folder, no network), runs it
through both models and prints the largest difference between the per-choice log-likelihoods,
the accuracies, and how many greedy generations are identical. tests/serve/test_lm_eval_harness.py
asserts the same on a tiny random model; this script shows it on a real one (docs/serve.md).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import textwrap
from pathlib import Path

MC = [
    ("What colour is a clear daytime sky?", ["blue", "green", "red", "black"], 0),
    ("How many legs does a spider have?", ["six", "eight", "four", "ten"], 1),
    ("Which of these is a fruit?", ["a stone", "a chair", "an apple", "a cloud"], 2),
    ("At what temperature does water freeze, in degrees Celsius?", ["100", "50", "-40", "0"], 3),
    ("What do bees make?", ["honey", "milk", "silk", "glass"], 0),
    ("Which planet do we live on?", ["Mars", "Earth", "Venus", "Jupiter"], 1),
    ("What is the opposite of hot?", ["warm", "loud", "cold", "fast"], 2),
    ("Which animal says 'moo'?", ["a cat", "a dog", "a duck", "a cow"], 3),
    ("How many days are in a week?", ["seven", "five", "ten", "twelve"], 0),
    ("What do you use to write on paper?", ["a spoon", "a pen", "a shoe", "a cup"], 1),
]
GEN = ["The capital of France is", "Q: What is 3 + 4?\nA:", "A short poem about the sea:\n",
       "Three primary colours are", "def add(a, b):\n"]


def write_task(folder: Path) -> None:
    data = folder / "data"
    data.mkdir(parents=True)
    (data / "mc.jsonl").write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n"
                                           for q, c, a in MC))
    (data / "gen.jsonl").write_text("".join(json.dumps({"prompt": p, "target": ""}) + "\n" for p in GEN))
    head = f"dataset_path: json\ntest_split: test\ndataset_kwargs:\n  cache_dir: {folder / 'cache'}\n  data_files:\n"
    (folder / "bench_mc.yaml").write_text(head + f"    test: {data / 'mc.jsonl'}\n" + textwrap.dedent("""\
        task: bench_mc
        output_type: multiple_choice
        doc_to_text: "Question: {{question}}\\nAnswer:"
        doc_to_choice: "{{choices}}"
        doc_to_target: "{{answer}}"
        metric_list:
          - metric: acc
            aggregation: mean
            higher_is_better: true
        """))
    (folder / "bench_gen.yaml").write_text(head + f"    test: {data / 'gen.jsonl'}\n" + textwrap.dedent("""\
        task: bench_gen
        output_type: generate_until
        doc_to_text: "{{prompt}}"
        doc_to_target: "{{target}}"
        generation_kwargs:
          until: ["\\n\\n", "Q:"]
          max_gen_toks: 32
          do_sample: false
          temperature: 0
        metric_list:
          - metric: exact_match
            aggregation: mean
            higher_is_better: true
        """))


def run(model: str, model_args: dict, folder: Path, batch_size: int) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(model=model, model_args=model_args, tasks=["bench_mc", "bench_gen"], batch_size=batch_size,
                          task_manager=TaskManager(include_path=str(folder), include_defaults=False),
                          device="cpu", log_samples=True, bootstrap_iters=0)
    samples = {k: sorted(v, key=lambda s: s["doc_id"]) for k, v in out["samples"].items()}
    return {"ll": [r[0][0] for s in samples["bench_mc"] for r in s["resps"]],
            "gen": [s["resps"][0][0] for s in samples["bench_gen"]],
            "acc": out["results"]["bench_mc"]["acc,none"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="an embedded name or a local folder")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    import torch

    from rlhfkit.models.loading import resolve_model
    from rlhfkit.serve.server import start_background

    torch.set_num_threads(args.threads)
    folder = resolve_model(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        write_task(Path(tmp))
        # softmax_dtype float32: lm-eval's hf model otherwise takes the log-softmax of bfloat16 logits
        # in bfloat16, while the server upcasts them to float32 (rlhfkit.losses.token_logps)
        hf = run("hf", {"pretrained": folder, "dtype": args.dtype, "softmax_dtype": "float32"}, Path(tmp),
                 args.batch_size)
        with start_background(folder, served_model_name="m", dtype=args.dtype) as server:
            served = run("local-completions", {"model": "m", "base_url": server.base_url + "/completions",
                                               "tokenizer": folder}, Path(tmp), args.batch_size)
    diffs = [abs(a - b) for a, b in zip(hf["ll"], served["ll"])]
    same = sum(a == b for a, b in zip(hf["gen"], served["gen"]))
    print(f"model {args.model} ({args.dtype}), batch size {args.batch_size}")
    print(f"log-likelihoods: {len(diffs)} choices, max |hf - served| = {max(diffs):.2e}, "
          f"mean {sum(diffs) / len(diffs):.2e}; accuracy hf {hf['acc']:.2f}, served {served['acc']:.2f}")
    print(f"greedy generations identical: {same}/{len(GEN)}")
    for a, b in zip(hf["gen"], served["gen"]):
        print(f"  hf {a!r}\n  sv {b!r}" if a != b else f"  == {a!r}")


if __name__ == "__main__":
    main()
