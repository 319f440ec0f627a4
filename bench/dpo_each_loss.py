"""Train the embedded SmolLM2-135M-Instruct with every DPO loss through the CLI, and tabulate.

    .venv/bin/python bench/dpo_each_loss.py [--pairs 32] [--steps 8] [--lr 5e-6]

Not a benchmark of speed: a check, on the real model, that each registered loss
(``rlhfkit.losses.DPO_LOSSES``) trains — the loss falls and the implicit-reward margin and
accuracy on the training pairs rise — through exactly the command a user runs
(``rlhfkit dpo --loss NAME``). Each loss gets the same pairs (the committed benchmark pairs),
seed, learning rate and β (SimPO uses its own β = 2 and γ = 0.5, as in its paper; IPO's β is its
regulariser, kept at 0.1). It prints, per loss, the first and last metrics rows and the seconds
per step.
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
    parser.add_argument("--pairs", type=int, default=32, help="training pairs (from the committed bench pairs)")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per loss")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=5e-6)
    parser.add_argument("--losses", default="", help="comma-separated subset (default: all)")
    args = parser.parse_args()

    from rlhfkit.losses import DPO_LOSSES

    losses = args.losses.split(",") if args.losses else list(DPO_LOSSES)
    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()][:args.pairs]
    rlhfkit = str(Path(sys.executable).with_name("rlhfkit"))
    print(f"SmolLM2-135M-Instruct, {len(rows)} pairs, {args.steps} steps of {args.batch_size} pairs, "
          f"lr {args.lr} constant, fp32, load average {os.getloadavg()[0]:.2f}")
    print(f"{'loss':10s} {'loss first→last':>18s} {'margin first→last':>20s} {'acc first→last':>15s} "
          f"{'s/step':>7s} {'total s':>8s}")
    failed = []
    with tempfile.TemporaryDirectory(prefix="dpo-each-loss-") as tmp:
        data = Path(tmp) / "pairs.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        for name in losses:
            extra = ["--beta", "2.0", "--simpo-gamma", "0.5"] if name == "simpo" else ["--beta", "0.1"]
            if name == "robust":
                extra += ["--label-smoothing", "0.1"]
            out = Path(tmp) / name
            cmd = [rlhfkit, "dpo", "--model", "smollm2-135m", "--data", str(data), "--output", str(out),
                   "--loss", name, "--max-steps", str(args.steps), "--batch-size", str(args.batch_size),
                   "--lr", str(args.lr), "--lr-schedule", "constant", "--warmup-ratio", "0",
                   "--max-length", "256", "--seed", "0", "--no-progress", *extra]
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
            print(f"{name:10s} {first['loss']:8.4f}→{last['loss']:<8.4f} "
                  f"{first['rewards/margins']:9.4f}→{last['rewards/margins']:<9.4f} "
                  f"{first['rewards/accuracies']:6.2f}→{last['rewards/accuracies']:<6.2f} "
                  f"{step_s:7.2f} {total:8.1f}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
