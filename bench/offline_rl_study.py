"""Does `rlhfkit offline-rl`, at its default settings, improve a policy from its own scored samples?

    .venv/bin/python bench/offline_rl_study.py [--output offline-rl-study] [--algos alol,awr] [--fresh]

The measurement behind docs/offline_rl.md, on SmolLM2-135M-Instruct (``smollm2-135m``) with the
demo's chatterbot-corpus prompts (the demo's split, seed 0) and the VADER compound score as the
reward (``rlhfkit.data.annotators:vader_reward``), which the policy never sees: it only reads the
scores written in the data file.

1. sample ``--samples`` completions per training prompt from the reference (the initial policy),
   temperature 0.7, at most 32 new tokens (its bfloat16 decoding copy where the CPU has native
   bfloat16, as the demo samples)
2. score them with VADER; write ``samples.jsonl`` as ``{prompt, completion, reward}``
3. ``rlhfkit offline-rl --algo ALGO --model smollm2-135m --data samples.jsonl --output DIR``,
   nothing else on the command line: the command's defaults
4. sample ``--eval-samples`` fresh completions per held-out prompt from the reference and from
   each trained policy, with the same seed; report the mean VADER score ± its standard error over
   prompts, the paired difference to the reference ± s.e., and KL(π ‖ π_ref) at the sampling
   temperature, the mean log-ratio on the policy's own samples (``evaluation.divergence.kl_to_reference``)

Every phase whose output exists is reused (``--fresh`` redoes all); the results are printed and
written to ``results.json`` in the output folder.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

TEMPERATURE, MAX_NEW_TOKENS, SEED = 0.7, 32, 0


def timing(started: float, cpu: float) -> dict:
    """Wall and CPU seconds (all threads) since ``started`` / ``cpu``."""
    return {"seconds": round(time.time() - started, 1), "cpu_seconds": round(time.process_time() - cpu, 1)}


def sample(model, tokenizer, prompts: list[str], n: int, seed: int) -> tuple[list[list[int]], list[list[list[int]]]]:
    """(prompt ids, n response ids per prompt) at the study's temperature and length."""
    from rlhfkit.data.chat import encode_prompt
    from rlhfkit.generation.decoding import SamplingParams, decoding_copy, generate_ids

    params = SamplingParams(strategy="sample", temperature=TEMPERATURE, max_new_tokens=MAX_NEW_TOKENS, n=n, seed=seed)
    prompt_ids = [encode_prompt(tokenizer, p) for p in prompts]
    return prompt_ids, generate_ids(decoding_copy(model), tokenizer, prompt_ids, params, batch_size=max(1, 64 // n),
                                    progress=f"sampling {len(prompts)} x {n}")


def texts(tokenizer, responses: list[list[list[int]]]) -> list[list[str]]:
    from rlhfkit.generation.decoding import decode_response

    return [[decode_response(tokenizer, r) for r in rows] for rows in responses]


def write_samples(out: Path, train_prompts: list[str], n: int) -> dict:
    """Phases 1-2: the reference's scored samples of the training prompts."""
    from rlhfkit.data.annotators import vader_reward
    from rlhfkit.data.io import write_jsonl
    from rlhfkit.models.loading import load_policy

    started, cpu = time.time(), time.process_time()
    model, tokenizer = load_policy("smollm2-135m")
    _, responses = sample(model, tokenizer, train_prompts, n, SEED)
    rows = [{"prompt": p, "completion": c} for p, cs in zip(train_prompts, texts(tokenizer, responses)) for c in cs]
    for row, reward in zip(rows, vader_reward([r["prompt"] for r in rows], [r["completion"] for r in rows])):
        row["reward"] = reward
    write_jsonl(out / "samples.jsonl", rows)
    rewards = [r["reward"] for r in rows]
    return {"samples": len(rows), "prompts": len(train_prompts), "reward_mean": statistics.fmean(rewards),
            "reward_sd": statistics.pstdev(rewards), **timing(started, cpu)}


def train(out: Path, algo: str) -> dict:
    """Phase 3: the command at its defaults; its last metrics row and the time it took."""
    from rlhfkit.cli import main

    folder = out / algo
    started, cpu = time.time(), time.process_time()
    code = main(["offline-rl", "--algo", algo, "--model", "smollm2-135m", "--data", str(out / "samples.jsonl"),
                 "--output", str(folder)])
    if code != 0:
        raise SystemExit(f"offline-rl --algo {algo} exited with {code}")
    last = json.loads((folder / "metrics.jsonl").read_text().splitlines()[-1])
    keep = ("step", "loss", "offline/kept_fraction", "value/mse", "value/var_explained", "offline/log_ratio",
            "offline/importance_weight_mean", "offline/awr_weight_mean", "offline/clipfrac")
    return {**timing(started, cpu), **{k: last[k] for k in keep if k in last}}


def mean_se(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))


def evaluate(out: Path, held_prompts: list[str], n: int, algos: list[str]) -> dict:
    """Phase 4: fresh samples of the held-out prompts, same seed for every policy."""
    from rlhfkit.data.annotators import vader_reward
    from rlhfkit.evaluation.divergence import kl_to_reference
    from rlhfkit.models.loading import load_policy
    from rlhfkit.models.packed import Group

    started, cpu = time.time(), time.process_time()
    reference, tokenizer = load_policy("smollm2-135m")
    results, per_prompt = {}, {}
    for name in ["reference", *algos]:
        model = reference if name == "reference" else load_policy(str(out / name))[0]
        prompt_ids, responses = sample(model, tokenizer, held_prompts, n, SEED + 1)
        scores = [vader_reward([p] * n, cs) for p, cs in zip(held_prompts, texts(tokenizer, responses))]
        per_prompt[name] = [statistics.fmean(s) for s in scores]
        mean, se = mean_se(per_prompt[name])
        entry = {"reward_mean": round(mean, 4), "reward_se": round(se, 4)}
        if name != "reference":
            diff, diff_se = mean_se([a - b for a, b in zip(per_prompt[name], per_prompt["reference"])])
            groups = [Group(p, rows) for p, rows in zip(prompt_ids, responses)]
            entry.update(diff=round(diff, 4), diff_se=round(diff_se, 4),
                         kl=round(kl_to_reference(model, reference, groups, TEMPERATURE), 3))
        entry["example"] = {"prompt": held_prompts[0], "completion": texts(tokenizer, responses)[0][0]}
        results[name] = entry
    return {"prompts": len(held_prompts), "samples_per_prompt": n, **timing(started, cpu), **results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default="offline-rl-study")
    parser.add_argument("--algos", default="alol,awr", help="comma-separated offline-rl --algo values")
    parser.add_argument("--train-prompts", type=int, default=96)
    parser.add_argument("--samples", type=int, default=4, help="samples per training prompt")
    parser.add_argument("--held-out", type=int, default=64)
    parser.add_argument("--eval-samples", type=int, default=4, help="samples per held-out prompt and policy")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: the least CPU time per result on a shared machine)")
    parser.add_argument("--fresh", action="store_true", help="redo every phase")
    args = parser.parse_args()

    import shutil

    import torch

    from rlhfkit.data.corpora import chatterbot_prompts, split_prompts

    torch.set_num_threads(args.threads)

    out = Path(args.output)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    algos = [a for a in args.algos.split(",") if a]
    train_prompts, held = split_prompts(chatterbot_prompts(), args.held_out, SEED)
    report_path = out / "results.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    started, cpu = time.time(), time.process_time()
    if not (out / "samples.jsonl").exists():
        report["data"] = write_samples(out, train_prompts[:args.train_prompts], args.samples)
    for algo in algos:
        if not (out / algo / "model.safetensors").exists():
            report[algo] = train(out, algo)
    report["eval"] = evaluate(out, held, args.eval_samples, algos)
    report["this_run"] = {**timing(started, cpu), "threads": args.threads}
    report_path.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
