"""GRPO iteration time: `rlhfkit ppo --algo grpo` vs TRL's GRPOTrainer, same model, prompts, reward and work.

    .venv/bin/python bench/grpo_vs_trl.py [--iterations 3] [--warmup 1] [--threads 2] [--sides trl,grpo,ppo]

What is compared (see DESIGN.md, "Benchmarking fairly"):
- SmolLM2-135M-Instruct (the embedded `smollm2-135m`, one folder for both), fp32, ``--threads``
  intra-op threads. Each iteration: 4 prompts x 4 completions = 16 rollouts, at most 32 new tokens
  (temperature 1, no top-p/top-k), the same reward callable (``rlhfkit.data.annotators:vader_reward``,
  the VADER compound score of the completion text; TRL's conversational completions are unwrapped
  to their text first), a frozen reference model with beta 0.04, one gradient pass over the 16
  rollouts (one optimizer step: AdamW, lr 1e-6 constant, max grad norm 1).
- TRL 1.16 GRPOTrainer at its fastest honest setting on CPU: no vLLM, ``num_iterations=1`` and
  ``steps_per_generation=1`` (so it skips the old-policy log-prob pass), gradient checkpointing off,
  ``bf16=False`` (TRL defaults to bf16 autocast), plain ``model.generate`` with its KV cache.
- rlhfkit ``ppo --algo grpo`` at its defaults (one pass, k3 KL in the loss) with those settings, and
  ``--algo ppo`` (value head, GAE, KL in the reward) with the same 16 rollouts and ``--ppo-epochs 1``.
- The prompts: the first 16 chatterbot-corpus prompts of bench/data/smollm2_chatterbot_pairs.jsonl,
  as a user message under the SmolLM2 chat template on both sides.
- Each side runs in its own child process (so its peak RSS, ``getrusage`` maxrss, is its own):
  ``--warmup`` untimed iterations, then ``--iterations`` timed ones (the wall time between the ends
  of consecutive iterations: generation, reference pass, reward, update, logging).
- FLOPs per iteration, the same useful work for every side: 10·N·T, N the parameter count, T the
  tokens of the 16 prompt+completion sequences without padding (mean prompt length over the 16
  prompts x 16 + the side's mean completion length x 16): 2·N·T for generation (each token's forward
  once, through the KV cache), 2·N·T for the reference forward, 6·N·T for the update (forward +
  backward = 3 x forward). Reported as a fraction of the measured ``torch.mm`` 2048x2048 fp32 peak.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PAIRS = HERE / "data" / "smollm2_chatterbot_pairs.jsonl"
PROMPTS, GENERATIONS, MAX_NEW_TOKENS, BETA, LR = 4, 4, 32, 0.04, 1e-6
REWARD = "rlhfkit.data.annotators:vader_reward"
SIDES = ("trl", "grpo", "ppo")


def bench_prompts(count: int) -> list[str]:
    """The first ``count`` distinct prompts of the committed chatterbot pairs."""
    seen: list[str] = []
    for line in PAIRS.read_text().splitlines():
        prompt = json.loads(line)["prompt"] if line.strip() else None
        if prompt and prompt not in seen:
            seen.append(prompt)
    return seen[:count]


def trl_reward(prompts, completions, **_) -> list[float]:
    """The same VADER callable; TRL hands conversational completions as message lists."""
    from rlhfkit.data.annotators import vader_reward

    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return vader_reward(prompts, texts)


def run_trl(model_path: str, prompts: list[str], steps: int, workdir: str) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlhfkit.models.loading import load_tokenizer

    class Timer(TrainerCallback):
        def __init__(self):
            self.ends, self.lengths = [], []

        def on_train_begin(self, args, state, control, **kw):
            self.ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            self.ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                self.lengths.append(logs["completions/mean_length"])

    args = GRPOConfig(output_dir=workdir, per_device_train_batch_size=PROMPTS * GENERATIONS,
                      num_generations=GENERATIONS, steps_per_generation=1, num_iterations=1,
                      max_completion_length=MAX_NEW_TOKENS, temperature=1.0, beta=BETA, learning_rate=LR,
                      lr_scheduler_type="constant", max_grad_norm=1.0, max_steps=steps, use_vllm=False,
                      gradient_checkpointing=False, bf16=False, use_cpu=True, report_to="none",
                      save_strategy="no", logging_steps=1, disable_tqdm=True, dataloader_num_workers=0,
                      log_completions=False, seed=0)
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in prompts])
    trainer = GRPOTrainer(model=model_path, reward_funcs=trl_reward, args=args, train_dataset=dataset,
                          processing_class=load_tokenizer(model_path))
    trainer.remove_callback(PrinterCallback)
    timer = Timer()
    trainer.add_callback(timer)
    trainer.train()
    return {"times": [b - a for a, b in zip(timer.ends, timer.ends[1:])], "lengths": timer.lengths}


def run_rlhfkit(algo: str, model_path: str, prompts: list[str], steps: int, workdir: str) -> dict:
    import contextlib
    import io

    from rlhfkit.data.io import write_jsonl
    from rlhfkit.recipes import ppo
    from rlhfkit.training import start_run

    data = Path(workdir) / "prompts.jsonl"
    write_jsonl(data, [{"messages": [{"role": "user", "content": p}]} for p in prompts])
    cfg = ppo.Config(model=model_path, prompts=str(data), reward=[REWARD], output=str(Path(workdir) / "out"),
                     algo=algo, batch_size=PROMPTS, samples_per_prompt=GENERATIONS, max_new_tokens=MAX_NEW_TOKENS,
                     kl_coef=BETA, lr=LR, lr_schedule="constant", max_grad_norm=1.0, max_steps=steps,
                     ppo_epochs=1 if algo == "ppo" else 0, sample_every=0, logging_steps=1, progress=False,
                     save_total_limit=1, save_only_model=True, seed=0)
    with contextlib.redirect_stdout(io.StringIO()), start_run(cfg) as run:
        rows = ppo.train(cfg, run).history
    ends = [r["elapsed_s"] for r in rows]
    parts = {k: [r[k] for r in rows] for k in ("time/generation", "time/rollout_forward", "time/scoring",
                                                "time/update")}
    return {"times": [ends[0]] + [b - a for a, b in zip(ends, ends[1:])],
            "lengths": [r["completions/mean_length"] for r in rows], "parts": parts,
            "ppo_epochs": cfg.ppo_epochs}


def child(side: str, threads: int, steps: int, model_path: str) -> int:
    """Runs one side in this process and prints its JSON result on the last line."""
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TQDM_DISABLE", "1")
    torch.set_num_threads(threads)
    from rlhfkit.models.loading import quiet_transformers

    quiet_transformers()
    prompts = bench_prompts(PROMPTS * steps)
    with tempfile.TemporaryDirectory(prefix=f"bench-grpo-{side}-") as tmp:
        out = (run_trl(model_path, prompts, steps, tmp) if side == "trl"
               else run_rlhfkit(side, model_path, prompts, steps, tmp))
    out["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))
    return 0


def model_facts(model_path: str, prompts: list[str]) -> tuple[int, float]:
    """(N parameters, tied embeddings counted once; mean prompt tokens under the chat template)."""
    import transformers

    from rlhfkit.data.chat import encode_prompt
    from rlhfkit.models.loading import load_tokenizer

    model = transformers.AutoModelForCausalLM.from_pretrained(model_path)
    n_params = sum(p.numel() for p in model.parameters())
    tokenizer = load_tokenizer(model_path)
    lengths = [len(encode_prompt(tokenizer, [{"role": "user", "content": p}])) for p in prompts]
    return n_params, sum(lengths) / len(lengths)


def run_side(side: str, args, model_path: str) -> dict:
    steps = args.warmup + args.iterations
    cmd = [sys.executable, __file__, "--child", side, "--threads", str(args.threads), "--steps", str(steps),
           "--model-path", model_path]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    if done.returncode:
        sys.exit(f"{side} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(side: str, out: dict, warmup: int, n_params: int, prompt_tokens: float, peak: float) -> float:
    timed, lengths = out["times"][warmup:], out["lengths"][warmup:]
    seconds = statistics.median(timed)
    tokens = [GENERATIONS * PROMPTS * (prompt_tokens + length) for length in lengths]
    mfu = statistics.median(10 * n_params * t / s / 1e9 / peak for t, s in zip(tokens, timed))
    line = (f"{side:5s} {seconds:6.2f} s/iteration (timed: {', '.join(f'{t:.2f}' for t in timed)}); mean completion "
            f"{statistics.mean(lengths):.1f} tokens; 10·N·T = {mfu * 100:.0f}% of the matmul peak; peak RSS "
            f"{out['maxrss_mb']:.0f} MB")
    if "parts" in out:
        parts = {k.split("/")[1]: statistics.median(v[warmup:]) for k, v in out["parts"].items()}
        line += (f"\n      time/*: generation {parts['generation']:.2f} s (of which the no-grad reference/"
                 f"rollout forward {parts['rollout_forward']:.2f}), scoring {parts['scoring']:.2f}, "
                 f"update {parts['update']:.2f} (--ppo-epochs {out['ppo_epochs']})")
    print(line, flush=True)
    return seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sides", default=",".join(SIDES))
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--model-path", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.threads, args.steps, args.model_path)
    if args.warmup < 1 or args.iterations < 1:
        sys.exit("--warmup and --iterations must be >= 1 (the first iteration includes start-up)")
    import torch
    import transformers
    import trl

    from rlhfkit.models.loading import quiet_transformers, resolve_model

    quiet_transformers()
    model_path = resolve_model(args.model)
    n_params, prompt_tokens = model_facts(model_path, bench_prompts(PROMPTS * (args.warmup + args.iterations)))
    from dpo_vs_trl import matmul_peak  # bench/ is on sys.path: the one peak measurement

    peak = matmul_peak(args.threads, "fp32")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}; "
          f"{args.threads} threads; load average {os.getloadavg()[0]:.2f}")
    print(f"model {args.model}: N = {n_params / 1e6:.1f} M; fp32 matmul peak (torch.mm 2048x2048) {peak:.0f} GFLOP/s; "
          f"{PROMPTS} prompts x {GENERATIONS} completions, <= {MAX_NEW_TOKENS} new tokens, beta {BETA}; mean "
          f"prompt {prompt_tokens:.1f} tokens; {args.warmup} warm-up + {args.iterations} timed iterations per side\n")
    seconds = {side: report(side, run_side(side, args, model_path), args.warmup, n_params, prompt_tokens, peak)
               for side in args.sides.split(",")}
    print()
    if "trl" in seconds and "grpo" in seconds:
        print(f"speed-up (TRL s/iteration / rlhfkit grpo s/iteration): {seconds['trl'] / seconds['grpo']:.2f}x "
              "(target >= 1.5x)")
    if "grpo" in seconds and "ppo" in seconds:
        print(f"rlhfkit ppo / grpo s/iteration: {seconds['ppo'] / seconds['grpo']:.2f}x (target <= 1.3x)")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
