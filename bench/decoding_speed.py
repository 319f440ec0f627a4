"""Decoding speed: transformers' ``generate`` vs rlhfkit's decoding loop, float32 vs a bfloat16 copy.

    .venv/bin/python bench/decoding_speed.py [--threads 2] [--rows 16] [--new-tokens 32] [--reps 3]

What is measured, on SmolLM2-135M-Instruct (the embedded `smollm2-135m`), ``--threads`` intra-op threads:
- a GRPO-sized rollout: ``--rows`` rows, 4 samples of each of the first rows/4 chatterbot prompts of
  bench/data/smollm2_chatterbot_pairs.jsonl (SmolLM2's chat template, left-padded), exactly
  ``--new-tokens`` tokens each (EOS ignored, so every way runs the same steps), temperature 0.7;
- four ways: ``model.generate`` (``do_sample``, ``num_return_sequences=4``: torch.multinomial, each
  prompt encoded 4 times) and ``rlhfkit.generation.decoding.decode_loop`` (``copies=4``: each prompt
  encoded once, its cache repeated; the exponential race from uniforms), each on the float32 model and
  on its bfloat16 decoding copy; best of ``--reps`` runs, as ms per token step (the prefill included);
- where a step's time goes: the model's single-token forward with the KV cache (mean over the steps of a
  rollout), and the draw alone (multinomial vs draw_tokens on [rows, vocabulary] logits);
- the memory bound: bytes a step must read (every weight once, plus the KV cache at the mean length)
  over this machine's measured streaming bandwidth (``torch.sum`` over 1 GiB of float32, best of 5), and
  the fraction of that bound each way reaches;
- the cost of sampling from the bfloat16 copy for RL: the importance ratio π_fp32(y)/π_bf16(y) of the
  copy's samples under the float32 policy (mean |ratio - 1| per token), which a rollout removes by
  recomputing the float32 log-probs (``rollout(..., sampler=...)``), and that recomputation's seconds.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

TEMPERATURE = 0.7
SAMPLES = 4  # responses per prompt, as GRPO/RLOO and the demo's preference collection sample them


def bandwidth_gbs() -> float:
    """Streaming read bandwidth: best of 5 sums over 1 GiB of float32."""
    import torch

    x = torch.ones(256 * 1024 * 1024)
    x.sum()
    best = min(_timed(x.sum) for _ in range(5))
    return x.numel() * 4 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def best_of(reps: int, fn) -> float:
    fn()  # warm-up
    return min(_timed(fn) for _ in range(reps))


def step_bytes(model, rows: int, mean_length: float) -> float:
    """Bytes one decoding step reads: every weight once, and the keys and values of every cached position."""
    cfg = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    elem = next(model.parameters()).element_size()
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    kv = 2 * cfg.num_hidden_layers * rows * cfg.num_key_value_heads * head_dim * mean_length * elem
    return weights + kv


def forward_ms(model, ids, mask, new_tokens: int) -> float:
    """Mean ms of the single-token forward with the KV cache over ``new_tokens`` steps."""
    import torch

    with torch.no_grad():
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        token, full, times = ids[:, -1:], mask, []
        for step in range(new_tokens):
            full = torch.cat([full, torch.ones_like(full[:, :1])], 1)
            t0 = time.perf_counter()
            out = model(input_ids=token, attention_mask=full, position_ids=positions[:, -1:] + 1 + step,
                        cache=out.cache, use_cache=True)
            times.append(time.perf_counter() - t0)
    return 1000 * sum(times[2:]) / len(times[2:])


def draw_ms(rows: int, vocab: int) -> dict[str, float]:
    import torch

    from rlhfkit.generation.decoding import draw_tokens

    logits = torch.randn(rows, vocab)
    return {"multinomial": 1000 * best_of(20, lambda: torch.multinomial(torch.softmax(logits, -1), 1)),
            "draw_tokens": 1000 * best_of(20, lambda: draw_tokens(logits))}


def ratio_to_copy(policy, copy, tokenizer, ids, mask, params) -> dict[str, float]:
    """Mean |π_fp32/π_bf16 - 1| per token of the copy's samples, and the float32 recomputation's seconds."""
    import torch

    from rlhfkit.generation.decoding import generate_rows
    from rlhfkit.rl.rollout import forward_response, response_mask
    from rlhfkit.rl.value import ActorCritic

    torch.manual_seed(0)
    sampled = generate_rows(copy, tokenizer, ids, mask.bool(), params, with_logits=True)
    real, _ = response_mask(sampled.ids, tokenizer.eos_token_id)
    with torch.no_grad():
        t0 = time.perf_counter()
        fp32 = forward_response(ActorCritic(policy), ids, mask.bool(), sampled.ids, real, TEMPERATURE,
                                with_values=False).logprobs
        seconds = time.perf_counter() - t0
    bf16 = torch.log_softmax(sampled.logits.float() / TEMPERATURE, -1).gather(-1, sampled.ids[..., None])[..., 0]
    ratio = (fp32 - bf16).exp()[real]
    return {"mean_abs_ratio_minus_1": float((ratio - 1).abs().mean()), "max_abs_log_ratio":
            float((fp32 - bf16)[real].abs().max()), "recompute_s": seconds, "tokens": int(real.sum())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from rlhfkit.data.chat import encode_prompt
    from rlhfkit.data.collate import pad_batch
    from rlhfkit.generation.decoding import SamplingParams, decode_loop, decoding_copy, generation_kwargs
    from rlhfkit.models.loading import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m")
    policy = load_causal_lm("smollm2-135m").eval()
    copy = decoding_copy(policy, "bfloat16")
    from grpo_vs_trl import bench_prompts  # bench/ is on sys.path

    encoded = [encode_prompt(tokenizer, p) for p in bench_prompts(args.rows // SAMPLES)]
    unique, unique_mask = pad_batch(encoded, tokenizer.pad_token_id, side="left")
    ids, mask = unique.repeat_interleave(SAMPLES, 0), unique_mask.repeat_interleave(SAMPLES, 0)
    params = SamplingParams(strategy="sample", temperature=TEMPERATURE, max_new_tokens=args.new_tokens)
    gen_kw = {**generation_kwargs(replace(params, n=SAMPLES), tokenizer), "min_new_tokens": args.new_tokens}
    mean_length = float(mask.sum(1).float().mean()) + args.new_tokens / 2
    bandwidth = bandwidth_gbs()
    print(f"threads {args.threads}, {args.rows} rows x {args.new_tokens} tokens, mean prompt "
          f"{float(mask.sum(1).float().mean()):.1f} tokens; streaming bandwidth {bandwidth:.1f} GB/s")
    print(f"{'way':<28}{'ms/step':>9}{'forward':>9}{'MB/step':>9}{'GB/s':>7}{'of bound':>10}")
    results = {}
    for dtype, model in (("float32", policy), ("bfloat16", copy)):
        forward = forward_ms(model, ids, mask, args.new_tokens)
        megabytes = step_bytes(model, args.rows, mean_length) / 1e6
        for way in ("generate", "decode_loop"):
            def run(model=model, way=way):
                with torch.no_grad():
                    if way == "generate":
                        return model.generate(input_ids=unique, attention_mask=unique_mask, **gen_kw)
                    return decode_loop(model, unique, unique_mask, params, [], tokenizer.pad_token_id,
                                       copies=SAMPLES)

            ms = 1000 * best_of(args.reps, run) / args.new_tokens
            rate = megabytes / ms  # MB/ms = GB/s
            results[f"{way} {dtype}"] = {"ms_per_step": ms, "forward_ms": forward, "mb_per_step": megabytes,
                                         "gb_per_s": rate, "fraction_of_bound": rate / bandwidth}
            print(f"{way + ' ' + dtype:<28}{ms:>9.1f}{forward:>9.1f}{megabytes:>9.0f}{rate:>7.1f}"
                  f"{rate / bandwidth:>9.0%}")
    draws = draw_ms(args.rows, policy.config.vocab_size)
    print(f"draw of {args.rows} tokens from {policy.config.vocab_size}: " +
          ", ".join(f"{k} {v:.2f} ms" for k, v in draws.items()))
    ratio = ratio_to_copy(policy, copy, tokenizer, ids, mask, params)
    print(f"bfloat16 copy's samples under the float32 policy ({ratio['tokens']} tokens): mean |ratio - 1| "
          f"{ratio['mean_abs_ratio_minus_1']:.4f}, max |log ratio| {ratio['max_abs_log_ratio']:.3f}; "
          f"float32 recomputation {ratio['recompute_s']:.2f} s")
    base = results["generate float32"]["ms_per_step"]
    print("speed-up over generate float32: " +
          ", ".join(f"{k} {base / v['ms_per_step']:.2f}x" for k, v in results.items()))
    print(json.dumps({"args": vars(args), "bandwidth_gbs": bandwidth, "ways": results, "draw_ms": draws,
                      "bf16_copy": ratio}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
