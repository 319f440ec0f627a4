"""A judge's agreement with the demo's oracle, on the demo's own preference pairs.

Samples the replies `rlhfkit demo` samples for its first preference prompts (one generate call of
the preset: every call is seeded alike, so these are exactly the demo's first replies for the
same --seed), draws --pairs of their candidate pairs with the seed, and labels them through the
demo's `--feedback ai` path (`rlhfkit.demo.label_with_judge`: rlhfkit ai-label's machinery, a
principle of the builtin constitution sampled per pair, both presentation orders asked). Prints
the pairs judged, how many were labelled confidently, the agreement of those labels with the
oracle (VADER: the chosen reply scores higher) with one binomial standard error, the position
bias and what was held back.

    OMP_NUM_THREADS=1 .venv/bin/python bench/demo_ai_feedback.py [--pairs 32] [--judge-model smollm2-135m]
        [--judge-url URL] [--judge-max-new-tokens 64] [--threads 1] [--output /tmp/demo-ai-feedback]

Every judge reply is journaled in OUTPUT/ai_label/requests.jsonl: rerunning with the same --output
(and flags) asks only what is missing, so a long run can be done in pieces. On a loaded machine
use one thread (OMP_NUM_THREADS=1 and --threads 1): decoding a 135M model is latency-bound.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=32, help="pairs judged (a seeded sample of the candidates)")
    parser.add_argument("--judge-model", default="smollm2-135m")
    parser.add_argument("--judge-url", default="")
    parser.add_argument("--judge-max-new-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="the --quick preset's pairs (16 new tokens)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--output", default="/tmp/demo-ai-feedback")
    args = parser.parse_args()

    import torch

    from rlhfkit import demo
    from rlhfkit.config import validated
    from rlhfkit.data.annotators import VaderSentiment
    from rlhfkit.data.constitution import load_constitution

    torch.set_num_threads(args.threads)
    cfg = validated(demo.Config(output=args.output, quick=args.quick, seed=args.seed, feedback="ai",
                                judge_model=args.judge_model, judge_url=args.judge_url,
                                judge_max_new_tokens=args.judge_max_new_tokens))
    preset = demo.QUICK if args.quick else demo.DEFAULT
    out = Path(cfg.output)
    (out / "data").mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    start = demo.prompts_and_model(cfg, preset, out, demo.Results())
    prompts = start.preference_prompts[:64 // preset.samples_per_prompt]  # the demo's first generate call
    replies = demo.sample_replies(start.sampler, start.tokenizer, prompts, preset, cfg.seed)
    candidates = [(p, a, b) for p, rs in zip(prompts, replies) for a, b in demo.candidate_pairs(rs)]
    chosen = sorted(random.Random(cfg.seed).sample(range(len(candidates)), min(args.pairs, len(candidates))))
    del start  # the policy's memory goes to the judge
    sampled = time.perf_counter()

    labelling = demo.label_with_judge(cfg, load_constitution(cfg.constitution), [candidates[i] for i in chosen], out)
    judged = time.perf_counter()
    ai = demo.judge_summary(labelling, demo.oracle_agreement(VaderSentiment(), labelling.rows))
    bias = ai["position_bias"]
    agreement = "n/a" if ai["oracle_agreement"] is None else (
        f"{100 * ai['oracle_agreement']:.1f}% ± {100 * ai['oracle_agreement_stderr']:.1f}")
    print(f"judge {ai['judge']}: {ai['pairs_judged']} pairs judged (of {len(candidates)} candidates from "
          f"{len(prompts)} prompts), {ai['labelled']} labelled confidently; held back: {ai['ties']} ties, "
          f"{ai['position_inconsistent']} position-inconsistent, {ai['unparsed']} unparsed "
          f"({labelling.stats['retried_verdicts']} verdicts asked again)")
    print(f"agreement with the oracle: {agreement} (one binomial s.e.) on {ai['oracle_pairs']} pairs")
    print(f"position bias: first {bias['first']}, second {bias['second']}, tie {bias['tie']}; first-position share "
          + ("n/a" if bias["first_share"] is None else f"{bias['first_share']:.2f}"))
    print(f"seconds: sampling {sampled - t0:.0f}, judging {judged - sampled:.0f} (judge requests in the journal: "
          f"{len((out / 'ai_label' / 'requests.jsonl').read_text().splitlines())})")


if __name__ == "__main__":
    main()
