"""DPO training speed: rlhfkit vs TRL's DPOTrainer, same model, data and hyper-parameters.

    OMP_NUM_THREADS=2 .venv/bin/python bench/dpo_vs_trl.py [--reps 1] [--warmup 2] [--steps 4] [--threads 2]
        [--cases short:fp32,short:bf16,mixed:fp32,mixed:bf16] [--profile mixed:fp32]

What is compared (see DESIGN.md, "Benchmarking fairly"), for each case (data × dtype):
- SmolLM2-135M-Instruct (the embedded `smollm2-135m`, one converted folder for both), ``--threads``
  intra-op threads, 8 pairs per step, max length 128, sigmoid DPO, β = 0.1, lr 1e-6 constant,
  AdamW (both fused), max grad norm 1, dropout off, no gradient checkpointing, a metrics row logged
  every step on both sides.
- The dtype: ``fp32`` (both float32), or ``bf16``: rlhfkit ``--bf16`` (bfloat16 autocast over
  float32 weights) against TRL ``bf16=True`` (accelerate's bfloat16 autocast over float32 weights).
- TRL 1.16 at its fastest setting for this case: ``precompute_ref_log_probs=True``,
  ``gradient_checkpointing=False`` (TRL's default is on), ``pad_to_multiple_of=None`` (its CPU
  default: pad to the longest row only), ``dataloader_num_workers=0`` (the batch is collated from
  already tokenized rows; workers only add start-up), and its chunked ("fused") LM head, which it
  always uses. ``padding_free=True`` is not an option in TRL 1.16 (it warns and falls back to
  padding), nor is a ``use_logits_to_keep``. rlhfkit with its defaults (packed forward, reference
  precomputed).
- The data: ``mixed`` = bench/data/smollm2_chatterbot_pairs.jsonl (chatterbot prompts, two SmolLM2
  answers of 30-88 tokens; bench/build_pairs.py); ``short`` = the same pairs with each answer cut to
  its first 30 tokens. Repetition r trains both sides on the same 8 pairs (8r..8r+7) at every step,
  so every step of a repetition is the same work for a side.
- Each side of each case runs in its own fresh Python process (TRL's bf16 is accelerate's
  process-wide ``AcceleratorState``, which the first Accelerator of a process fixes, and the peak
  memory of a side is only its own in its own process), the two sides one after the other,
  alternating which goes first. Tokenizing,
  model loading and the one-time reference precompute happen before the timed region. Timed: the
  wall time between consecutive optimizer-step ends (collation, forward, backward, clipping,
  optimizer step, metrics), steps ``--warmup``+1 .. ``--warmup``+``--steps``, median per side. The
  precompute is timed separately. Peak memory: the worker process's peak resident set (ru_maxrss:
  model loading, precompute and training together).
- Model FLOPs per step: 6·N·T, N the parameter count (tied embeddings counted once), T the tokens
  of the 16 prompt+completion sequences without padding: the same useful work for both sides, as a
  fraction of the measured ``torch.mm`` 2048×2048 peak in the case's dtype (float32 or bfloat16).
  The second fraction is what each side's matmuls compute: TRL's body on 16 rows padded to the
  longest and its chunked LM head on every position (on a CPU TRL 1.16 scores every position), 4
  passes (forward, recomputed in the backward, two gradient matmuls); rlhfkit's body on the packed
  row and its head on the completion positions, 3 passes.
"""

from __future__ import annotations

import argparse
import contextlib
import io
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
DEFAULT_DATA = HERE / "data" / "smollm2_chatterbot_pairs.jsonl"
BATCH, MAX_LENGTH, BETA, LR = 8, 128, 0.1, 1e-6
SHORT_TOKENS = 30
DEFAULT_CASES = "short:fp32,short:bf16,mixed:fp32,mixed:bf16"


def matmul_peak(threads: int, dtype: str, size: int = 2048, reps: int = 10) -> float:
    """Best-of-``reps`` GFLOP/s of ``torch.mm`` on two size×size matrices of ``dtype`` (fp32 or bf16)."""
    import torch

    torch.set_num_threads(threads)
    kind = torch.bfloat16 if dtype == "bf16" else torch.float32
    a, b = torch.randn(size, size, dtype=kind), torch.randn(size, size, dtype=kind)
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


def shortened(tokenizer, pairs: list[dict], tokens: int = SHORT_TOKENS) -> list[dict]:
    """The pairs with each answer cut to its first ``tokens`` tokens (the ``short`` data)."""
    def cut(text: str) -> str:
        return tokenizer.decode(tokenizer(text, add_special_tokens=False).input_ids[:tokens]).strip()

    return [{**p, "chosen": cut(p["chosen"]), "rejected": cut(p["rejected"])} for p in pairs]


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


# --------------------------------------------------------------------------------------------
# The two sides (each runs in a worker process: ``--worker trl|rlhfkit``)
# --------------------------------------------------------------------------------------------


def trl_config(workdir: str, steps: int, bf16: bool):
    from trl import DPOConfig

    return DPOConfig(output_dir=workdir, per_device_train_batch_size=BATCH, max_steps=steps, learning_rate=LR,
                     lr_scheduler_type="constant", beta=BETA, loss_type=["sigmoid"], max_length=MAX_LENGTH,
                     precompute_ref_log_probs=True, precompute_ref_batch_size=BATCH,
                     gradient_checkpointing=False, bf16=bf16, pad_to_multiple_of=None, padding_free=False,
                     use_cpu=True, report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
                     dataloader_num_workers=0, dataloader_pin_memory=False, max_grad_norm=1.0, seed=0)


def run_trl(model_path: str, pairs: list[dict], steps: int, workdir: str, bf16: bool) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import DPOTrainer

    from rlhfkit.models.loading import load_tokenizer

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.ends = []

        def on_train_begin(self, args, state, control, **kw):
            self.ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            self.ends.append(time.perf_counter())

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
        trainer = DPOTrainer(model=model, args=trl_config(workdir, steps, bf16), train_dataset=dataset,
                             processing_class=tokenizer)
    finally:
        DPOTrainer._precompute_ref_logps = original
    trainer.remove_callback(PrinterCallback)
    timer = StepTimer()
    trainer.add_callback(timer)
    trainer.train()
    return {"step_times": [b - a for a, b in zip(timer.ends, timer.ends[1:])],
            "precompute_s": timed.get("precompute_s", 0.0), "bf16": trainer.accelerator.mixed_precision == "bf16"}


@contextlib.contextmanager
def profiled_step(step: int, top: int = 25):
    """Profile the ``step``-th (1-based) call of ``training.optimizer_step`` with torch.profiler and
    print its top operators by self CPU time (to stderr of the worker, shown by ``--profile``)."""
    import torch

    from rlhfkit import training

    original, calls = training.optimizer_step, []

    def wrapper(*a, **kw):
        calls.append(1)
        if len(calls) != step:
            return original(*a, **kw)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            out = original(*a, **kw)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=60)
        print(table, file=sys.__stderr__, flush=True)
        return out

    training.optimizer_step = wrapper
    try:
        yield
    finally:
        training.optimizer_step = original


def run_rlhfkit(model_path: str, pairs: list[dict], steps: int, workdir: str, bf16: bool,
                profile_step: int = 0) -> dict:
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
                     save_total_limit=1, bf16=bf16)
    dpo.precompute_reference = timed_precompute
    profile = profiled_step(profile_step) if profile_step else contextlib.nullcontext()
    try:
        with contextlib.redirect_stdout(io.StringIO()), profile, start_run(cfg) as run:
            rows = dpo.train(cfg, run).history
            bf16_on = run.bf16
    finally:
        dpo.precompute_reference = original
    ends = [r["elapsed_s"] for r in rows]
    # The first interval runs from the start of the run (model loading included): a warm-up step.
    times = [ends[0]] + [b - a for a, b in zip(ends, ends[1:])]
    return {"step_times": times, "precompute_s": timed.get("precompute_s", 0.0), "bf16": bf16_on}


def worker(args) -> int:
    """One side of one case in this (fresh) process; prints its result as one JSON line."""
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    from rlhfkit.models.loading import quiet_transformers

    quiet_transformers()
    with contextlib.suppress(Exception):
        import datasets

        datasets.disable_progress_bars()
    pairs = json.loads(Path(args.pairs_file).read_text())
    bf16 = args.dtype == "bf16"
    with tempfile.TemporaryDirectory(prefix=f"bench-{args.worker}-") as tmp, \
            contextlib.redirect_stderr(io.StringIO()):
        if args.worker == "trl":
            out = run_trl(args.model_path, pairs, args.total_steps, tmp, bf16)
        else:
            out = run_rlhfkit(args.model_path, pairs, args.total_steps, tmp, bf16, args.profile_step)
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux
    print("RESULT " + json.dumps(out), flush=True)
    return 0


def run_side(side: str, dtype: str, pairs: list[dict], model_path: str, args, profile_step: int = 0) -> dict:
    """Run one side of a case in a fresh worker process and return its result."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(pairs, f)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, __file__, "--worker", side, "--dtype", dtype, "--pairs-file", f.name,
           "--model-path", model_path, "--total-steps", str(args.warmup + args.steps),
           "--threads", str(args.threads), "--profile-step", str(profile_step)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    if profile_step:
        print(proc.stderr, flush=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.exit(f"{side} {dtype} worker failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    out = json.loads(lines[-1][len("RESULT "):])
    if out["bf16"] != (dtype == "bf16"):
        sys.exit(f"{side} {dtype}: the worker's bfloat16 autocast is {'on' if out['bf16'] else 'off'}")
    return out


# --------------------------------------------------------------------------------------------
# The comparison
# --------------------------------------------------------------------------------------------


def model_sizes(model_path: str) -> tuple[int, int]:
    """(all parameters, LM head weight) of the model."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_path)
    return sum(p.numel() for p in model.parameters()), model.get_output_embeddings().weight.numel()


def step_flops(counts: dict, n_params: int, n_head: int) -> dict:
    """Useful model FLOPs (6·N·T) and what each side's matmuls compute (see the docstring)."""
    body = n_params - n_head
    return {"useful": 6 * n_params * counts["useful"],
            "trl": 6 * body * counts["padded"] + 8 * n_head * counts["padded"],
            "rlhfkit": 6 * body * counts["packed"] + 6 * n_head * counts["completion"]}


def run_case(data: str, dtype: str, chunks: list[list[dict]], model_path: str, sizes: tuple[int, int],
             peak: float, tokenizer, args) -> dict:
    """Both sides on each repetition's chunk; prints a line per repetition, returns the medians."""
    per_side: dict[str, list[dict]] = {"trl": [], "rlhfkit": []}
    ratios = []
    for rep, chunk in enumerate(chunks):
        counts = token_counts(tokenizer, chunk)
        flops = step_flops(counts, *sizes)
        order = ["trl", "rlhfkit"] if rep % 2 == 0 else ["rlhfkit", "trl"]
        line = [f"{data}:{dtype} rep {rep + 1}: {counts['useful']} tokens/step (TRL computes {counts['padded']} "
                f"padded, rlhfkit {counts['packed']} packed)"]
        for side in order:
            out = run_side(side, dtype, chunk, model_path, args)
            timed = out["step_times"][args.warmup:]
            s = statistics.median(timed)
            per_side[side].append({"s": s, "useful": flops["useful"] / s / 1e9 / peak,
                                   "computed": flops[side] / s / 1e9 / peak, "rss": out["peak_rss_gb"],
                                   "pre": out["precompute_s"]})
            line.append(f"{side} {s:.2f} s/step (timed {', '.join(f'{t:.2f}' for t in timed)}; precompute "
                        f"{out['precompute_s']:.1f} s; peak RSS {out['peak_rss_gb']:.2f} GB)")
        ratios.append(per_side["trl"][-1]["s"] / per_side["rlhfkit"][-1]["s"])
        print("; ".join(line), flush=True)
    summary = {side: {k: statistics.median(r[k] for r in rows) for k in rows[0]} for side, rows in per_side.items()}
    summary["ratio"] = statistics.median(ratios)
    summary["spread"] = (min(ratios), max(ratios))
    return summary


def print_summary(results: dict[tuple[str, str], dict], peaks: dict[str, float]) -> None:
    print("\ncase        side      s/step  useful/peak  computed/peak  peak RSS  precompute (8 pairs)")
    for (data, dtype), summary in results.items():
        for side in ("trl", "rlhfkit"):
            r = summary[side]
            print(f"{data + ':' + dtype:11s} {side:8s} {r['s']:7.2f}  {r['useful'] * 100:10.0f}%  "
                  f"{r['computed'] * 100:12.0f}%  {r['rss']:6.2f} GB  {r['pre']:6.1f} s")
    print("\nspeed-up (TRL s/step / rlhfkit s/step; target >= 2x in the same dtype):")
    for (data, dtype), summary in results.items():
        lo, hi = summary["spread"]
        print(f"  {data}:{dtype}: {summary['ratio']:.2f}x (reps {lo:.2f}-{hi:.2f}x); "
              f"{dtype} matmul peak {peaks[dtype]:.0f} GFLOP/s")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--cases", default=DEFAULT_CASES, help="comma-separated data:dtype, data short|mixed, "
                    "dtype fp32|bf16")
    ap.add_argument("--profile", default="", metavar="DATA:DTYPE",
                    help="instead of the comparison: profile one rlhfkit step (after the warm-up) of this case")
    # Internal: the worker process of one side.
    ap.add_argument("--worker", choices=["trl", "rlhfkit"], help=argparse.SUPPRESS)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help=argparse.SUPPRESS)
    ap.add_argument("--pairs-file", help=argparse.SUPPRESS)
    ap.add_argument("--model-path", help=argparse.SUPPRESS)
    ap.add_argument("--total-steps", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--profile-step", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        sys.exit("--warmup and --steps must be >= 1 (the first step includes start-up)")
    cases = [tuple(c.split(":")) for c in (args.profile or args.cases).split(",")]
    if any(len(c) != 2 or c[0] not in ("short", "mixed") or c[1] not in ("fp32", "bf16") for c in cases):
        sys.exit(f"--cases/--profile: expected data:dtype with data short|mixed and dtype fp32|bf16, got {cases}")
    args.case_list = cases
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    import torch
    import transformers
    import trl

    from rlhfkit.models.loading import load_tokenizer, quiet_transformers, resolve_model

    quiet_transformers()
    if not args.data.exists():
        sys.exit(f"{args.data} not found: build it with bench/build_pairs.py")
    pairs = [json.loads(line) for line in args.data.read_text().splitlines() if line.strip()]
    if len(pairs) < BATCH * args.reps:
        sys.exit(f"{args.data}: {len(pairs)} pairs, need {BATCH * args.reps}")
    model_path = resolve_model(args.model)
    tokenizer = load_tokenizer(model_path)
    chunks = {"mixed": [pairs[r * BATCH:(r + 1) * BATCH] for r in range(args.reps)]}
    chunks["short"] = [shortened(tokenizer, c) for c in chunks["mixed"]]
    if args.profile:
        data, dtype = args.case_list[0]
        out = run_side("rlhfkit", dtype, chunks[data][0], model_path, args, profile_step=args.warmup + 1)
        print(f"rlhfkit {data}:{dtype} step times: {', '.join(f'{t:.2f}' for t in out['step_times'])}")
        return 0
    peaks = {dtype: matmul_peak(args.threads, dtype) for dtype in ("fp32", "bf16")}
    sizes = model_sizes(model_path)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}; "
          f"{args.threads} threads; load average {os.getloadavg()[0]:.2f}")
    print(f"model {args.model}: N = {sizes[0] / 1e6:.1f} M parameters; matmul peak (torch.mm 2048x2048) fp32 "
          f"{peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s")
    print(f"{args.reps} repetition(s) x ({args.warmup} warm-up + {args.steps} timed steps), batch {BATCH} pairs, "
          f"max length {MAX_LENGTH}; each side in a fresh process\n")
    results = {(data, dtype): run_case(data, dtype, chunks[data], model_path, sizes, peaks[dtype], tokenizer, args)
               for data, dtype in args.case_list}
    print_summary(results, peaks)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
