"""PPO's update on SmolLM2-135M: seconds per minibatch, the padded batch (before) vs the packed row (after).

    OMP_NUM_THREADS=1 taskset -c 1 .venv/bin/python bench/ppo_update.py [--threads 1] [--reps 3] [--warmup 1]

What is measured, in one process, both paths alternating, in float32 and under bfloat16 autocast
(``torch.autocast("cpu", dtype=torch.bfloat16)``, float32 master weights, as ``--bf16``):
- the batch: 16 samples = 4 chatterbot-corpus prompts (bench/data/smollm2_chatterbot_pairs.jsonl, as
  a user message under the SmolLM2 chat template) × 4 responses of 8..32 tokens (seeded random
  lengths and token ids, each ending with EOS; the matmuls do not depend on the ids), left-padded
  prompts and right-padded responses as a rollout makes them;
- ``update``: one PPO minibatch of the 16 samples through ``recipes.ppo.minibatch_loss`` (value head,
  clipped policy and value losses, k3 KL in the loss), forward and backward (the AdamW step, the same
  on both paths, is not timed);
- ``reference``: the no-grad pass of the rollout's reference log-probs (``forward_response``);
- ``padded``: the pass before packing (what ``forward_response(..., packed=False)`` runs, forced here
  by patching ``rollout._packable``: the left-padded [N, P+R] batch, columns that are padding in
  every row cut); ``packed``: one row, each prompt once,
  no padding, the LM head only where a response token is predicted (rlhfkit.models.packed).
Useful work, the same for both paths: 6·N·T + 6·N_head·n + attention for the update (2·… for the
reference pass), N the trunk's matmul parameters, T the tokens of the distinct prompts once plus
every response token, N_head the LM head's (d × V), n the response tokens, attention the causal
QKᵀ and AV products of every prompt+response sequence. Reported in GFLOP/s and as a fraction of
``torch.mm``'s 2048×2048 peak in the same dtype and thread count (``dpo_vs_trl.matmul_peak``).
Median of ``--reps`` timed repetitions after ``--warmup`` untimed ones.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from contextlib import nullcontext
from unittest import mock

PROMPTS, SAMPLES, MIN_RESPONSE, MAX_RESPONSE = 4, 4, 8, 32


def build_batch(tokenizer, seed: int = 0):
    """The 16-sample Rollout (old log-probs, values and advantages filled in by :func:`inputs`)."""
    import torch

    from grpo_vs_trl import bench_prompts  # bench/ is on sys.path
    from rlhfkit.data.chat import encode_prompt
    from rlhfkit.data.collate import pad_batch
    from rlhfkit.rl.rollout import Rollout, response_mask

    g = torch.Generator().manual_seed(seed)
    prompts = [[{"role": "user", "content": p}] for p in bench_prompts(PROMPTS)]
    encoded = [encode_prompt(tokenizer, p) for p in prompts for _ in range(SAMPLES)]
    prompt_ids, prompt_mask = pad_batch(encoded, tokenizer.pad_token_id, side="left")
    lengths = torch.randint(MIN_RESPONSE, MAX_RESPONSE + 1, (len(encoded),), generator=g)
    responses = [torch.randint(100, tokenizer.vocab_size, (int(n) - 1,), generator=g).tolist()
                 + [tokenizer.eos_token_id] for n in lengths]
    response_ids, _ = pad_batch(responses, tokenizer.pad_token_id)
    mask, has_eos = response_mask(response_ids, tokenizer.eos_token_id)
    zeros = torch.zeros(mask.shape)
    n = len(encoded)
    return Rollout(prompts=tuple(p for p in prompts for _ in range(SAMPLES)), completions=("",) * n,
                   prompt_ids=prompt_ids, prompt_mask=prompt_mask.bool(), response_ids=response_ids,
                   response_mask=mask, logprobs=zeros, ref_logprobs=zeros, values=zeros, entropy=zeros,
                   has_eos=has_eos, group=torch.arange(PROMPTS).repeat_interleave(SAMPLES),
                   scores=torch.zeros(n))


def useful_flops(actor, batch) -> dict[str, float]:
    """FLOPs of the update (forward + backward) and of the reference pass, on the real tokens only."""
    import torch

    from rlhfkit.rl.rollout import response_groups

    groups, _ = response_groups(batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.lengths)
    tokens = sum(g.num_tokens for g in groups)
    predicted = int(batch.lengths.sum())
    trunk = sum(m.weight.numel() for m in actor.trunk().modules() if isinstance(m, torch.nn.Linear))
    head = actor.lm_head().weight.numel()
    config = actor.causal_lm().config
    width = config.num_attention_heads * getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)
    squares = sum((len(g.prompt) + len(c)) ** 2 for g in groups for c in g.completions)
    attention = config.num_hidden_layers * 2 * width * squares  # QKᵀ and AV, causal half: 2·(2·S²·d)/2
    forward = 2 * (trunk * tokens + head * predicted) + attention
    return {"update": 3 * forward, "reference": forward, "tokens": tokens, "trunk": trunk, "head": head}


def inputs(actor, batch, seed: int = 0):
    """The batch with its old log-probs and values (one float32 no-grad pass), advantages, returns."""
    import dataclasses

    import torch

    from rlhfkit.rl.rollout import forward_response

    with torch.no_grad():
        out = forward_response(actor, batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask)
    g = torch.Generator().manual_seed(seed)
    advantages = torch.where(batch.response_mask, torch.randn(batch.response_mask.shape, generator=g), 0.0)
    batch = dataclasses.replace(batch, logprobs=out.logprobs, ref_logprobs=out.logprobs, values=out.values)
    return batch, advantages, out.values + advantages


def timed(fn, reps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - t0)
    return statistics.median(seconds)


def measure(actor, batch, advantages, returns, dtype: str, reps: int, warmup: int) -> dict[tuple[str, str], float]:
    """Seconds of (pass, path) for pass in update / reference and path in padded / packed."""
    import torch

    from rlhfkit.recipes.ppo import Config, minibatch_loss
    from rlhfkit.rl import rollout

    cfg = Config(prompts="x", output="y", reward="f.py:f", kl_in="loss", kl_estimator="k3")
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()
    args = (batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask)

    def update():
        actor.zero_grad(set_to_none=True)
        with autocast:
            loss, _ = minibatch_loss(actor, batch, advantages, returns, cfg, kl_coef=0.05)
        loss.backward()

    def reference():
        with torch.no_grad(), autocast:
            rollout.forward_response(actor, *args, with_values=False)

    seconds = {}
    for name, fn in (("update", update), ("reference", reference)):
        for path in ("padded", "packed"):
            with mock.patch.object(rollout, "_packable", lambda *_, packed=path == "packed": packed):
                seconds[name, path] = timed(fn, reps, warmup)
    return seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--dtypes", default="fp32,bf16")
    args = ap.parse_args()
    import torch

    from dpo_vs_trl import matmul_peak
    from rlhfkit.models.loading import load_causal_lm, load_tokenizer, quiet_transformers
    from rlhfkit.rl.value import ActorCritic, ValueHead

    quiet_transformers()
    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.model)
    policy = load_causal_lm(args.model)
    actor = ActorCritic(policy, ValueHead(policy.config.hidden_size)).eval()  # eval: no dropout, as ppo.update
    batch, advantages, returns = inputs(actor, build_batch(tokenizer))
    flops = useful_flops(actor, batch)
    padded_tokens = int(batch.prompt_mask.any(0).sum() + batch.response_mask.any(0).sum()) * batch.num_samples
    print(f"torch {torch.__version__}; {args.threads} thread(s); load average {os.getloadavg()[0]:.2f}; "
          f"model {args.model}: trunk matmuls {flops['trunk'] / 1e6:.1f} M, LM head {flops['head'] / 1e6:.1f} M")
    print(f"batch: {PROMPTS} prompts x {SAMPLES} samples, responses {MIN_RESPONSE}..{MAX_RESPONSE} tokens "
          f"({int(batch.lengths.sum())} in all); trunk tokens: padded {padded_tokens}, packed {flops['tokens']}; "
          f"median of {args.reps} after {args.warmup} warm-up")
    for dtype in args.dtypes.split(","):
        peak = matmul_peak(args.threads, dtype)
        torch.set_num_threads(args.threads)
        seconds = measure(actor, batch, advantages, returns, dtype, args.reps, args.warmup)
        print(f"\n{dtype}: matmul peak (torch.mm 2048x2048) {peak:.0f} GFLOP/s")
        for name in ("update", "reference"):
            for path in ("padded", "packed"):
                s = seconds[name, path]
                rate = flops[name] / s / 1e9
                print(f"  {name:9s} {path:6s} {s:6.2f} s/minibatch  {rate:6.1f} GFLOP/s  {rate / peak:4.0%} of peak")
            print(f"  {name:9s} padded / packed: {seconds[name, 'padded'] / seconds[name, 'packed']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
