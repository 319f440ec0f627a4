"""DPO training speed: rlhfkit vs TRL's DPOTrainer, same model, data and hyper-parameters.

    .venv/bin/python bench/dpo_vs_trl.py [--reps 5] [--warmup 2] [--steps 4] [--threads 2]

What is compared (see DESIGN.md, "Benchmarking fairly"):
- SmolLM2-135M-Instruct (the embedded `smollm2-135m`, one converted folder for both), fp32,
  ``--threads`` intra-op threads, 8 pairs per step, max length 128, sigmoid DPO, β = 0.1,
  lr 1e-6 constant, AdamW, max grad norm 1, dropout off (TRL's default), no gradient checkpointing.
- TRL at its fastest honest setting: ``precompute_ref_log_probs=True``,
  ``gradient_checkpointing=False``, ``bf16=False`` (TRL 1.16 defaults to bf16 autocast), its
  default fused AdamW. rlhfkit with its defaults (packed forward, precomputed reference).
- The data: chatterbot-corpus prompts with two SmolLM2 answers each (30-88 tokens, chosen by
  VADER sentiment; bench/build_pairs.py). Repetition r trains both sides on the same 8 pairs
  (pairs 8r..8r+7) at every step, so every step of a repetition is the same work for a side.
- One process, repetitions alternating which side runs first; each side runs ``--warmup``
  untimed steps then ``--steps`` timed ones (wall time between consecutive step ends: the
  data collation, forward, backward, optimizer step and logging). The one-time reference
  precompute is timed separately (the precompute passes only, on both sides).
- Model FLOPs per step: 6·N·T, N the parameter count (tied embeddings counted once: the LM head
  matmul is real work, the lookup is not), T the tokens of the 16 prompt+completion sequences
  without padding: the same useful work for both sides, so the fraction of the measured
  ``torch.mm`` 2048×2048 fp32 peak is comparable (rlhfkit computes each shared prompt once, so
  this "useful-work" fraction can exceed what its matmuls really do). The second figure is
  what each side's matmuls compute: TRL's body on 16 rows padded to the longest and its
  chunked LM head on every position, 4 passes (forward, recomputed in the backward, two
  gradient matmuls); rlhfkit's body on the packed row and its head on the completion
  positions, 3 passes. The precompute is 2·N·T.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE / "data" / "smollm2_chatterbot_pairs.jsonl"
BATCH, MAX_LENGTH, BETA, LR = 8, 128, 0.1, 1e-6


def matmul_peak(threads: int, size: int = 2048, reps: int = 10) -> float:
    """Best-of-``reps`` GFLOP/s of ``torch.mm`` on two size×size fp32 matrices."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best / 1e9


def conversational(pair: dict) -> dict:
    return {"prompt": [{"role": "user", "content": pair["prompt"]}],
            "chosen": [{"role": "assistant", "content": pair["chosen"]}],
            "rejected": [{"role": "assistant", "content": pair["rejected"]}]}


def token_counts(tokenizer, pairs: list[dict]) -> dict:
    """Per step: ``useful`` tokens of the 2·B prompt+completion sequences (no padding); what TRL
    computes (``padded``: 2·B rows of the longest); what rlhfkit computes (``packed``: each prompt
    once, no padding) and ``completion`` (the positions where its LM head runs)."""
    from rlhfkit.data.chat import encode
    from rlhfkit.data.schema import PreferenceExample
    from rlhfkit.recipes.dpo import encode_pair

    lengths, packed, completion = [], 0, 0
    for p in pairs:
        ex = conversational(p)
        for side in ("chosen", "rejected"):
            lengths.append(len(encode(tokenizer, ex["prompt"], ex[side]).input_ids))
        group = encode_pair(tokenizer, PreferenceExample(ex["prompt"], ex["chosen"], ex["rejected"]),
                            MAX_LENGTH).group
        packed += group.num_tokens
        completion += sum(sum(s) for s in group.scored)
    return {"useful": sum(lengths), "padded": len(lengths) * max(lengths), "packed": packed,
            "completion": completion}


def run_trl(model_path: str, pairs: list[dict], steps: int, workdir: str) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from rlhfkit.models.loading import load_tokenizer

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.ends = []

        def on_train_begin(self, args, state, control, **kw):
            self.ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            self.ends.append(time.perf_counter())

    args = DPOConfig(output_dir=workdir, per_device_train_batch_size=BATCH, max_steps=steps, learning_rate=LR,
                     lr_scheduler_type="constant", beta=BETA, loss_type=["sigmoid"], max_length=MAX_LENGTH,
                     precompute_ref_log_probs=True, precompute_ref_batch_size=BATCH,
                     gradient_checkpointing=False, bf16=False, use_cpu=True, report_to="none",
                     save_strategy="no", logging_steps=1, disable_tqdm=True, dataloader_num_workers=0,
                     max_grad_norm=1.0, seed=0)
    tokenizer = load_tokenizer(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    dataset = Dataset.from_list([conversational(p) for p in pairs])
    timed = {}
    original = DPOTrainer._precompute_ref_logps

    def timed_precompute(self, *a, **kw):
        t0 = time.perf_counter()
        out = original(self, *a, **kw)
        timed["precompute_s"] = timed.get("precompute_s", 0.0) + time.perf_counter() - t0
        return out

    DPOTrainer._precompute_ref_logps = timed_precompute
    try:
        trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    finally:
        DPOTrainer._precompute_ref_logps = original
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    timer = StepTimer()
    trainer.add_callback(timer)
    trainer.train()
    return {"step_times": [b - a for a, b in zip(timer.ends, timer.ends[1:])],
            "precompute_s": timed.get("precompute_s", 0.0)}


def run_rlhfkit(model_path: str, pairs: list[dict], steps: int, workdir: str) -> dict:
    from rlhfkit.data.io import write_jsonl
    from rlhfkit.recipes import dpo
    from rlhfkit.training import start_run

    data = Path(workdir) / "pairs.jsonl"
    write_jsonl(data, [conversational(p) for p in pairs])
    timed = {}
    original = dpo.precompute_reference

    def timed_precompute(*a, **kw):
        t0 = time.perf_counter()
        out = original(*a, **kw)
        timed["precompute_s"] = time.perf_counter() - t0
        return out

    cfg = dpo.Config(model=model_path, data=str(data), output=str(Path(workdir) / "out"), batch_size=BATCH,
                     max_steps=steps, lr=LR, lr_schedule="constant", beta=BETA, loss="sigmoid",
                     max_length=MAX_LENGTH, max_grad_norm=1.0, logging_steps=1, progress=False, seed=0,
                     save_total_limit=1)
    dpo.precompute_reference = timed_precompute
    try:
        with contextlib.redirect_stdout(io.StringIO()), start_run(cfg) as run:
            rows = dpo.train(cfg, run).history
    finally:
        dpo.precompute_reference = original
    ends = [r["elapsed_s"] for r in rows]
    # The first interval runs from the start of the run (model loading included): a warm-up step.
    times = [ends[0]] + [b - a for a, b in zip(ends, ends[1:])]
    return {"step_times": times, "precompute_s": timed.get("precompute_s", 0.0)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--model", default="smollm2-135m")
    args = ap.parse_args()
    if args.warmup < 1 or args.steps < 1:
        sys.exit("--warmup and --steps must be >= 1 (the first step includes start-up)")

    import warnings

    import torch
    import transformers

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TQDM_DISABLE", "1")
    import trl

    from rlhfkit.models.loading import load_tokenizer, quiet_transformers, resolve_model

    quiet_transformers()
    try:
        import datasets

        datasets.disable_progress_bars()
    except Exception:
        pass
    if not args.data.exists():
        sys.exit(f"{args.data} not found: build it with bench/build_pairs.py")
    pairs = [json.loads(l) for l in args.data.read_text().splitlines() if l.strip()]
    if len(pairs) < BATCH * args.reps:
        sys.exit(f"{args.data}: {len(pairs)} pairs, need {BATCH * args.reps}")
    model_path = resolve_model(args.model)
    tokenizer = load_tokenizer(model_path)
    reference_model = transformers.AutoModelForCausalLM.from_pretrained(model_path)
    n_params = sum(p.numel() for p in reference_model.parameters())
    n_head = reference_model.get_output_embeddings().weight.numel()
    del reference_model
    peak = matmul_peak(args.threads)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}; "
          f"{args.threads} threads; load average {os.getloadavg()[0]:.2f}")
    print(f"model {args.model}: N = {n_params / 1e6:.1f} M parameters; fp32 matmul peak "
          f"(torch.mm 2048x2048) {peak:.0f} GFLOP/s")
    print(f"{args.reps} repetitions x ({args.warmup} warm-up + {args.steps} timed steps), batch {BATCH} pairs, "
          f"max length {MAX_LENGTH}\n")

    total = args.warmup + args.steps
    results = {"trl": [], "rlhfkit": []}
    precompute = {"trl": [], "rlhfkit": []}
    flops_per_step = []
    hardware = {"trl": [], "rlhfkit": []}
    for rep in range(args.reps):
        chunk = pairs[rep * BATCH:(rep + 1) * BATCH]
        counts = token_counts(tokenizer, chunk)
        tokens = counts["useful"]
        flops_per_step.append(6 * n_params * tokens)
        body = n_params - n_head
        # What each side's matmuls actually compute: TRL's body on the padded rows and its chunked
        # head on every position (forward, recomputed in the backward, two gradient matmuls);
        # rlhfkit's body on the packed row and its head on the completion positions.
        hardware["trl"].append(6 * body * counts["padded"] + 8 * n_head * counts["padded"])
        hardware["rlhfkit"].append(6 * body * counts["packed"] + 6 * n_head * counts["completion"])
        order = ["trl", "rlhfkit"] if rep % 2 == 0 else ["rlhfkit", "trl"]
        line = [f"rep {rep + 1}: {tokens} tokens/step (TRL computes {counts['padded']} padded, rlhfkit "
                f"{counts['packed']} packed)"]
        for side in order:
            with tempfile.TemporaryDirectory(prefix=f"bench-{side}-") as tmp, \
                    contextlib.redirect_stderr(io.StringIO()):
                out = (run_trl if side == "trl" else run_rlhfkit)(model_path, chunk, total, tmp)
            timed = out["step_times"][args.warmup:]
            results[side].append(statistics.median(timed))
            precompute[side].append((out["precompute_s"], tokens))
            line.append(f"{side} {results[side][-1]:.2f} s/step (timed steps: "
                        f"{', '.join(f'{t:.2f}' for t in timed)}; precompute {out['precompute_s']:.1f} s)")
        print("; ".join(line), flush=True)

    ratios = [t / r for t, r in zip(results["trl"], results["rlhfkit"])]
    print()
    for side in ("trl", "rlhfkit"):
        mfu = [f / t / 1e9 / peak for f, t in zip(flops_per_step, results[side])]
        hfu = [f / t / 1e9 / peak for f, t in zip(hardware[side], results[side])]
        pre = [s for s, _ in precompute[side]]
        pre_mfu = [2 * n_params * tok / s / 1e9 / peak for s, tok in precompute[side] if s > 0]
        print(f"{side:8s} median {statistics.median(results[side]):.2f} s/step "
              f"(reps {min(results[side]):.2f}-{max(results[side]):.2f}); model FLOPs (6·N·useful tokens) "
              f"{statistics.median(mfu) * 100:.0f}% of the matmul peak, FLOPs its matmuls compute "
              f"{statistics.median(hfu) * 100:.0f}%; one-time reference precompute"
              f" {statistics.median(pre):.1f} s per {BATCH} pairs"
              + (f" ({statistics.median(pre_mfu) * 100:.0f}% of peak)" if pre_mfu else ""))
    print(f"speed-up (TRL s/step / rlhfkit s/step): median {statistics.median(ratios):.2f}x, "
          f"spread {min(ratios):.2f}-{max(ratios):.2f}x over {len(ratios)} repetitions; "
          f"load average at the end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
