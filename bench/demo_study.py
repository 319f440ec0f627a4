"""The measurements behind the demo's preset (docs/demo.md "Status"): reward-model data and PPO settings.

    .venv/bin/python bench/demo_study.py samples                      # ~14 min: the shared samples
    .venv/bin/python bench/demo_study.py rm NAME PROMPTS PAIRS EPOCHS [start=0]
    .venv/bin/python bench/demo_study.py ppo NAME RM_DIR [field=value ...]

Not a speed benchmark. Everything is the demo's setting (SmolLM2-135M-Instruct, temperature 0.7,
at most 32 new tokens, the demo's prompt split with seed 0, the VADER oracle and its noisy
annotator at T = 0.25) and is written under ``$DEMO_STUDY_DIR`` (default ``demo-study/``):

- ``samples``: for the 64 held-out prompts, one sample each (seed 1: the baseline every win rate
  is measured against, as in the demo) and 8 more each (seed 5); for the first 384 train prompts,
  4 samples each (seed 0). Saved as ``samples.json``.
- ``rm``: a reward model (`rlhfkit rm`, MiniLM-L6, lr 1e-4, batch 8) on preference pairs judged by
  the annotator from the train prompts ``start .. PROMPTS`` (PAIRS = ``one``: replies 1 and 2 only,
  the old demo; ``all``: all 6 pairs of the 4 replies, InstructGPT style), then measured on the
  held-out samples: the correlation of its scores with VADER (overall and within a prompt) and
  the oracle win rate of best-of-2/4/8 picked by it (next to best-of-N picked by the oracle).
- ``ppo``: `rlhfkit ppo` with the demo's PPO preset, any field overridden (``lr=3e-5``,
  ``value_lr=1e-3``, ...), then the held-out oracle win rate of one sample of the trained policy
  (seed 2) over the baseline sample, its KL to the initial policy, oracle and reward-model means.

Every result is printed as one JSON line and appended to ``results.jsonl``.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

WORK = Path(os.environ.get("DEMO_STUDY_DIR", "demo-study"))
TEMPERATURE, MAX_NEW_TOKENS = 0.7, 32


def record(result: dict) -> None:
    print(json.dumps(result), flush=True)
    with open(WORK / "results.jsonl", "a") as f:
        f.write(json.dumps(result) + "\n")


def win_rate(candidate, baseline) -> float:
    candidate, baseline = np.asarray(candidate), np.asarray(baseline)
    return round(float(np.mean((candidate > baseline) + 0.5 * (candidate == baseline))), 3)


def samples() -> None:
    from rlhfkit.data.corpora import chatterbot_prompts, split_prompts
    from rlhfkit.data.io import write_jsonl
    from rlhfkit.generation.decoding import SamplingParams, generate_chat
    from rlhfkit.models.loading import load_policy

    train, held = split_prompts(chatterbot_prompts(), 64, 0)
    model, tokenizer = load_policy("smollm2-135m")

    def generate(prompts, n, seed, batch_size):
        params = SamplingParams(strategy="sample", temperature=TEMPERATURE, max_new_tokens=MAX_NEW_TOKENS, n=n,
                                seed=seed)
        return generate_chat(model, tokenizer, prompts, params, batch_size=batch_size)

    started = time.time()
    out = {"train": train, "held": held, "base": [o[0] for o in generate(held, 1, 1, 32)],
           "held8": generate(held, 8, 5, 8), "pref_prompts": train[:384], "pref4": generate(train[:384], 4, 0, 16)}
    (WORK / "samples.json").write_text(json.dumps(out))
    write_jsonl(WORK / "prompts_train.jsonl", [{"prompt": p} for p in train])
    print(f"samples written to {WORK} in {time.time() - started:.0f} s")


def reward_model(name: str, prompts: int, which: str, epochs: int, start: int = 0) -> None:
    from rlhfkit.data.annotators import VaderSentiment, vader_annotator
    from rlhfkit.data.io import write_jsonl
    from rlhfkit.demo import judge_all_pairs
    from rlhfkit.models.reward import load_reward_model
    from rlhfkit.recipes import rm as rm_recipe

    data = json.loads((WORK / "samples.json").read_text())
    oracle, annotator = VaderSentiment(), vader_annotator(0.25, 0)
    pairs = []
    for prompt, replies in list(zip(data["pref_prompts"], data["pref4"]))[start:prompts]:
        pairs += judge_all_pairs(prompt, replies[:2] if which == "one" else replies, annotator)
    random.Random(0).shuffle(pairs)
    path = WORK / f"pairs_{name}.jsonl"
    write_jsonl(path, pairs)
    started = time.time()
    rm_recipe.main(rm_recipe.Config(model="minilm-l6", data=str(path), output=str(WORK / f"rm_{name}"), epochs=epochs,
                                    batch_size=8, lr=1e-4, max_length=192, seed=0, warmup_ratio=0.1, progress=False))
    seconds = time.time() - started
    rm = load_reward_model(str(WORK / f"rm_{name}"))
    held, flat = data["held"], [r for replies in data["held8"] for r in replies]
    scores = np.array(rm.score([p for p in held for _ in range(8)], flat)).reshape(len(held), 8)
    vader = np.array(oracle(flat)).reshape(len(held), 8)
    base = oracle(data["base"])
    centred = lambda x: (x - x.mean(1, keepdims=True)).ravel()  # noqa: E731
    result = {"rm": name, "pairs": len(pairs), "epochs": epochs, "train_s": round(seconds),
              "corr": round(float(np.corrcoef(scores.ravel(), vader.ravel())[0, 1]), 3),
              "within_prompt_corr": round(float(np.corrcoef(centred(scores), centred(vader))[0, 1]), 3)}
    rows = np.arange(len(held))
    for n in (2, 4, 8):
        result[f"best_of_{n}_by_rm"] = win_rate(vader[rows, scores[:, :n].argmax(1)], base)
        result[f"best_of_{n}_by_oracle"] = win_rate(vader[:, :n].max(1), base)
    record(result)


def ppo_run(name: str, rm_dir: str, overrides: list[str]) -> None:
    from rlhfkit.data.annotators import VaderSentiment
    from rlhfkit.evaluation.divergence import kl_to_reference
    from rlhfkit.evaluation.frontier import sample_groups, sample_policy
    from rlhfkit.models.loading import load_causal_lm, load_policy
    from rlhfkit.models.reward import load_reward_model
    from rlhfkit.recipes import ppo
    from rlhfkit.training import start_run

    fields = ppo.Config.__dataclass_fields__
    given = dict(o.split("=", 1) for o in overrides)
    settings = dict(model="smollm2-135m", reward=rm_dir, prompts=str(WORK / "prompts_train.jsonl"),
                    output=str(WORK / f"ppo_{name}"), max_steps=14, batch_size=16, max_new_tokens=MAX_NEW_TOKENS,
                    temperature=TEMPERATURE, seed=0, lr=3e-5, value_lr=1e-3, kl_coef=0.05, ppo_epochs=1,
                    minibatch_size=8, warmup_ratio=0.0, lr_schedule="constant", sample_every=0, progress=False)
    for key, value in given.items():
        default = fields[key].default
        settings[key] = value in ("1", "true", "True") if isinstance(default, bool) else type(default)(value)
    started = time.time()
    cfg = ppo.Config(**settings)
    with start_run(cfg) as run:
        rows = ppo.train(cfg, run).history
    seconds = time.time() - started
    data = json.loads((WORK / "samples.json").read_text())
    held = data["held"]
    initial, tokenizer = load_policy("smollm2-135m")
    policy = load_causal_lm(str(WORK / f"ppo_{name}")).eval()
    prompt_ids, response_ids, texts = sample_policy(policy, tokenizer, held, TEMPERATURE, MAX_NEW_TOKENS, 2)
    kl = kl_to_reference(policy, initial, sample_groups(prompt_ids, response_ids), TEMPERATURE)
    oracle, rm = VaderSentiment(), load_reward_model(rm_dir)
    trained, base = oracle(texts), oracle(data["base"])
    record({"ppo": name, "rm_dir": rm_dir, **given, "train_s": round(seconds), "win_rate": win_rate(trained, base),
            "kl": round(kl, 2), "oracle_mean": round(float(np.mean(trained)), 3),
            "oracle_mean_initial": round(float(np.mean(base)), 3),
            "rm_mean": round(float(np.mean(rm(held, texts))), 3),
            "rm_mean_initial": round(float(np.mean(rm(held, data["base"]))), 3),
            "batch_scores": [round(r["objective/scores"], 2) for r in rows],
            "batch_kl": [round(r["objective/kl"], 2) for r in rows]})


def main(argv: list[str]) -> None:
    torch.set_num_threads(int(os.environ.get("RLHFKIT_THREADS", "2")))
    WORK.mkdir(parents=True, exist_ok=True)
    if argv[:1] == ["samples"]:
        samples()
    elif argv[:1] == ["rm"] and len(argv) >= 5:
        reward_model(argv[1], int(argv[2]), argv[3], int(argv[4]), int(argv[5].split("=")[1]) if len(argv) > 5 else 0)
    elif argv[:1] == ["ppo"] and len(argv) >= 3:
        ppo_run(argv[1], argv[2], argv[3:])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
