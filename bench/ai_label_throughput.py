"""ai-label throughput: preference pairs labelled per minute against `rlhfkit serve` on SmolLM2.

Starts `rlhfkit serve --model smollm2-135m` in the background on 127.0.0.1 (a free port), then
labels the same pairs with `rlhfkit ai-label --judge-url ... --concurrency C` for each C, each
run into a fresh output folder (no journal to resume from), and prints pairs per minute, the
judge requests sent and the label statistics. The pairs are the first N of
bench/data/smollm2_chatterbot_pairs.jsonl (chatterbot-corpus prompts, two SmolLM2 replies each,
chosen by VADER: build_pairs.py), so stats.json also gives the judge's agreement with VADER.

    .venv/bin/python bench/ai_label_throughput.py [--pairs 16] [--concurrency 1 4] [--threads 2]
        [--max-new-tokens 128]

Timed: the ai-label process from start to exit (reading the data, the constitution, every judge
request in both orders, the retries of unparseable verdicts, writing the outputs); not timed:
the server's start-up (model load). Run it on a quiet machine (`uptime`).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
PAIRS = HERE / "data" / "smollm2_chatterbot_pairs.jsonl"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, server: subprocess.Popen, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"rlhfkit serve exited with code {server.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1.0)
    raise SystemExit("rlhfkit serve did not become healthy in time")


def label(data: Path, url: str, concurrency: int, max_new_tokens: int, out: Path, env: dict) -> tuple[float, dict]:
    cmd = [sys.executable, "-m", "rlhfkit", "ai-label", "--data", str(data), "--output", str(out),
           "--judge-url", f"{url}/v1", "--judge-model", "smollm2-135m", "--concurrency", str(concurrency),
           "--judge-max-new-tokens", str(max_new_tokens)]
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"ai-label failed ({done.returncode}): {done.stderr.strip()}")
    stats = json.loads((out / "stats.json").read_text())
    stats["requests"] = len((out / "requests.jsonl").read_text().splitlines())
    return seconds, stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the server")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="--judge-max-new-tokens")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="ai-label-bench-"))
    data = tmp / "pairs.jsonl"
    data.write_text("".join(PAIRS.read_text().splitlines(keepends=True)[:args.pairs]))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    print(f"load average at start: {os.getloadavg()[0]:.2f}", flush=True)
    server = subprocess.Popen([sys.executable, "-m", "rlhfkit", "serve", "--model", "smollm2-135m", "--port",
                               str(port), "--threads", str(args.threads), "--log-level", "warning"],
                              env={**env, "OMP_NUM_THREADS": str(args.threads)})
    try:
        wait_healthy(url, server)
        for c in args.concurrency:
            seconds, stats = label(data, url, c, args.max_new_tokens, tmp / f"out-c{c}", env)
            agreement = stats["agreement"] or {}
            print(f"concurrency {c}: {stats['pairs']} pairs in {seconds:.1f} s = {60 * stats['pairs'] / seconds:.1f} "
                  f"pairs/min ({stats['requests']} requests, {stats['retried_verdicts']} retried); labelled "
                  f"{stats['labelled']}, position-inconsistent {stats['position_inconsistent']}, ties {stats['ties']}, "
                  f"unparsed {stats['unparsed']}; first-position share {stats['position_bias']['first_share']}; "
                  f"agreement with VADER {agreement.get('rate')}", flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"load average at end: {os.getloadavg()[0]:.2f}; outputs in {tmp}")


if __name__ == "__main__":
    main()
