"""Build the benchmark's preference pairs: chatterbot-corpus prompts, two SmolLM2 samples each.

The chosen answer is the one with the higher VADER compound score (the demo's simulated
annotator), so the pairs look like real preference data. Both answers are 30-88 tokens and
every prompt+answer fits in 128 tokens, so neither trainer truncates anything.

    .venv/bin/python bench/build_pairs.py  [--out bench/data/smollm2_chatterbot_pairs.jsonl]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "data" / "smollm2_chatterbot_pairs.jsonl"


def build(out: Path, num_prompts: int = 200, seed: int = 0, max_length: int = 128, target: int = 64,
          batch_size: int = 16) -> int:
    """Sample, filter and write pairs batch by batch (the file grows as it goes); stop at ``target``."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    from rlhfkit.data.chat import encode
    from rlhfkit.data.corpora import chatterbot_prompts
    from rlhfkit.data.io import write_jsonl
    from rlhfkit.generation.decoding import SamplingParams, generate_chat
    from rlhfkit.models.loading import load_policy

    torch.set_num_threads(2)
    model, tokenizer = load_policy("smollm2-135m")
    prompts = chatterbot_prompts()[:num_prompts]
    vader = SentimentIntensityAnalyzer()
    out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    t0 = time.time()
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        params = SamplingParams(strategy="sample", temperature=0.9, top_p=0.95, max_new_tokens=84, n=2,
                                seed=seed + start)
        for prompt, (a, b) in zip(chunk, generate_chat(model, tokenizer, chunk, params, batch_size=batch_size)):
            if not a or not b or a == b:
                continue
            lengths = []
            for answer in (a, b):
                enc = encode(tokenizer, prompt, answer)
                lengths.append((sum(enc.trained), len(enc.input_ids)))
            if not all(30 <= n <= 90 and total <= max_length for n, total in lengths):
                continue
            sa, sb = vader.polarity_scores(a)["compound"], vader.polarity_scores(b)["compound"]
            if sa == sb:
                continue
            chosen, rejected = (a, b) if sa > sb else (b, a)
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        write_jsonl(out, rows)
        print(f"{start + len(chunk)} prompts sampled, {len(rows)} pairs kept ({time.time() - t0:.0f} s)",
              flush=True)
        if len(rows) >= target:
            break
    print(f"wrote {len(rows)} pairs to {out}", flush=True)
    return len(rows)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--num-prompts", type=int, default=200)
    ap.add_argument("--target", type=int, default=64, help="stop once this many pairs are kept")
    args = ap.parse_args()
    build(args.out, args.num_prompts, target=args.target)
