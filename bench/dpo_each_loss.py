"""Train the embedded SmolLM2-135M-Instruct with every DPO loss through the CLI, and tabulate.

    .venv/bin/python bench/dpo_each_loss.py [--pairs 16] [--steps 12] [--lr 1e-5]

Not a benchmark of speed: a check, on the real model, that each registered loss
(``rlhfkit.losses.DPO_LOSSES``) trains through exactly the command a user runs
(``rlhfkit dpo --loss NAME``): a few epochs over a small set of the committed benchmark pairs,
then the same pairs evaluated (``--eval-data``), so the loss must fall below its value at the
start (the first step, where the policy is still the reference: ln 2 for sigmoid) and the
implicit-reward margin and accuracy must rise. Each loss gets the same pairs, seed, learning
rate and β = 0.1 (SimPO uses its paper's β = 2 and γ = 0.5). It prints, per loss, the loss at
the first step, the evaluated loss, margin and accuracy after training, and seconds per step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "smollm2_chatterbot_pairs.jsonl"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=16, help="training pairs (from the committed bench pairs)")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per loss")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--losses", default="", help="comma-separated subset (default: all)")
    args = parser.parse_args()

    from rlhfkit.data.io import write_jsonl
    from rlhfkit.losses import DPO_LOSSES

    losses = args.losses.split(",") if args.losses else list(DPO_LOSSES)
    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()][:args.pairs]
    rlhfkit = str(Path(sys.executable).with_name("rlhfkit"))
    print(f"SmolLM2-135M-Instruct, {len(rows)} pairs, {args.steps} steps of {args.batch_size} pairs, "
          f"lr {args.lr} constant, fp32, load average {os.getloadavg()[0]:.2f}")
    print(f"{'loss':10s} {'loss at start':>13s} {'loss after':>11s} {'margin after':>13s} {'acc after':>10s} "
          f"{'s/step':>7s} {'total s':>8s}")
    failed = []
    with tempfile.TemporaryDirectory(prefix="dpo-each-loss-") as tmp:
        data = Path(tmp) / "pairs.jsonl"
        write_jsonl(data, rows)
        for name in losses:
            extra = ["--beta", "2.0", "--simpo-gamma", "0.5"] if name == "simpo" else ["--beta", "0.1"]
            if name == "robust":
                extra += ["--label-smoothing", "0.1"]
            out = Path(tmp) / name
            cmd = [rlhfkit, "dpo", "--model", "smollm2-135m", "--data", str(data), "--eval-data", str(data),
                   "--output", str(out), "--loss", name, "--max-steps", str(args.steps),
                   "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--lr-schedule", "constant",
                   "--warmup-ratio", "0", "--max-length", "256", "--seed", "0", "--no-progress", *extra]
            t0 = time.time()
            done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            total = time.time() - t0
            if done.returncode != 0:
                failed.append(name)
                print(f"{name:10s} FAILED (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
                continue
            metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            first, last = metrics[0], metrics[-1]
            # elapsed_s is wall time since the run started: the first step also holds the start-up
            # and the reference precompute, so the per-step figure excludes it
            step_s = (last["elapsed_s"] - first["elapsed_s"]) / max(len(metrics) - 1, 1)
            print(f"{name:10s} {first['loss']:13.4f} {last['eval/loss']:11.4f} {last['eval/rewards/margins']:13.4f} "
                  f"{last['eval/rewards/accuracies']:10.2f} {step_s:7.2f} {total:8.1f}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
