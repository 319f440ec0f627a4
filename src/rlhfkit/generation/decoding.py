"""Decoding strategies: the thin, tested layer around transformers' ``generate``.

transformers does the search (greedy, beam, top-k, top-p, min-p, temperature, repetition
penalty, KV cache); this module renders chat prompts, batches them with left padding, seeds the
sampler, cuts responses at EOS or a stop string, and returns plain records. Every sampler of
rlhfkit goes through it: :func:`generate_ids` (generate, best-of-N, rejection sampling, the
server, evaluation) and :func:`generate_rows` (PPO's rollout, which also keeps the logits and
hidden states that generation computed).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Literal, NamedTuple, get_args

import torch
import torch.nn.functional as F

from rlhfkit.data.chat import encode_prompt
from rlhfkit.data.collate import pad_batch

Strategy = Literal["greedy", "beam", "sample"]


@dataclass
class SamplingParams:
    strategy: Strategy = "sample"
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0              # 0 disables
    top_p: float = 1.0          # 1.0 disables
    min_p: float = 0.0          # 0 disables
    repetition_penalty: float = 1.0
    num_beams: int = 4          # beam strategy only
    n: int = 1                  # completions per prompt
    stop: list[str] = field(default_factory=list)
    seed: int | None = None

    def problems(self, names: Mapping[str, str] | None = None) -> list[str]:
        """What is wrong with these parameters, one line each. ``names``: how the caller spells
        a field in its messages (e.g. ``{"n": "--samples-per-prompt"}``); default: the field name."""
        name = {f.name: f.name for f in fields(self)} | dict(names or {})
        out = []
        if self.max_new_tokens < 1:
            out.append(f"{name['max_new_tokens']} must be >= 1")
        if self.strategy == "sample" and self.temperature <= 0:
            out.append(f"{name['temperature']} must be > 0 for sampling (use the greedy strategy instead)")
        if not 0 < self.top_p <= 1:
            out.append(f"{name['top_p']} must be in (0, 1]")
        if self.top_k < 0:
            out.append(f"{name['top_k']} must be >= 0")
        if not 0 <= self.min_p < 1:
            out.append(f"{name['min_p']} must be in [0, 1)")
        if self.repetition_penalty <= 0:
            out.append(f"{name['repetition_penalty']} must be > 0")
        if self.n < 1:
            out.append(f"{name['n']} must be >= 1")
        if self.strategy == "beam" and self.num_beams < max(1, self.n):
            out.append(f"{name['num_beams']} must be >= {name['n']} for beam search")
        return out


def generation_kwargs(params: SamplingParams, tokenizer) -> dict:
    """Keyword arguments for ``model.generate`` implementing ``params``."""
    kw = dict(max_new_tokens=params.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
              eos_token_id=tokenizer.eos_token_id, repetition_penalty=params.repetition_penalty,
              use_cache=True)
    if params.strategy == "greedy":
        kw.update(do_sample=False, num_beams=1)
    elif params.strategy == "beam":
        kw.update(do_sample=False, num_beams=params.num_beams, num_return_sequences=params.n, early_stopping=True)
    else:
        kw.update(do_sample=True, temperature=params.temperature, top_k=params.top_k or None,
                  top_p=params.top_p, min_p=params.min_p or None, num_return_sequences=params.n)
    # Override the model's own generation_config defaults (e.g. a stored top_k=50) explicitly.
    if params.strategy != "sample":
        kw.update(temperature=None, top_k=None, top_p=None, min_p=None)
    return kw


def trim_response(tokens: list[int], eos_id: int | None, pad_id: int | None) -> tuple[list[int], bool]:
    """Cut a generated row after its first EOS (kept); drop padding. Returns (tokens, ended)."""
    out = []
    for t in tokens:
        if eos_id is not None and t == eos_id:
            out.append(t)
            return out, True
        if pad_id is not None and t == pad_id and pad_id != eos_id:
            break
        out.append(t)
    return out, False


def apply_stop(text: str, stop: list[str]) -> str:
    cut = min((text.find(s) for s in stop if s and s in text), default=-1)
    return text if cut < 0 else text[:cut]


class Generated(NamedTuple):
    """New tokens of a batch of rows and, on request, what ``generate`` computed for them anyway."""

    ids: torch.Tensor                    # [N, R] new tokens, right-padded with the pad token
    logits: torch.Tensor | None          # [N, R, V] the raw (unprocessed) logits that predicted each token
    hidden: torch.Tensor | None          # [N, R, H] the trunk's final (normed) hidden state they came from


def _generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, kw: dict, *, with_logits: bool = False,
              with_hidden: bool = False) -> Generated:
    """One ``model.generate`` call on a left-padded batch (the only one in rlhfkit)."""
    device = next(model.parameters()).device
    if with_logits or with_hidden:
        kw = {**kw, "return_dict_in_generate": True, "output_logits": with_logits,
              "output_hidden_states": with_hidden}
    out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **kw)
    sequences = out.sequences if hasattr(out, "sequences") else out
    logits = torch.stack(out.logits, dim=1) if with_logits else None
    hidden = None
    if with_hidden:  # step 0 holds the whole prompt: keep its last position
        last = [out.hidden_states[0][-1][:, -1:]] + [h[-1] for h in out.hidden_states[1:]]
        hidden = torch.cat(last, dim=1)
    return Generated(sequences[:, input_ids.shape[1]:], logits, hidden)


@torch.no_grad()
def generate_ids(model, tokenizer, prompt_ids: list[list[int]], params: SamplingParams,
                 batch_size: int = 8, stopping_criteria: list | None = None,
                 progress: str | None = None) -> list[list[list[int]]]:
    """``params.n`` responses (token ids, each cut after EOS) for each prompt.

    ``stopping_criteria``: extra ``transformers.StoppingCriteria`` passed to every ``generate``
    call (one per chunk of ``batch_size`` prompts); a stateful one that tracks rows (the
    server's per-request stop strings and streaming) needs a single chunk. ``progress``: the
    label of a progress bar over the chunks (none by default).
    """
    was_training = model.training
    model.eval()
    out: list[list[list[int]]] = []
    kw = generation_kwargs(params, tokenizer)
    if stopping_criteria:
        from transformers import StoppingCriteriaList

        kw["stopping_criteria"] = StoppingCriteriaList(list(stopping_criteria))
    starts = range(0, len(prompt_ids), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=progress, dynamic_ncols=True)
    for start in starts:
        batch = prompt_ids[start:start + batch_size]
        if params.seed is not None:
            torch.manual_seed(params.seed + start)
        new = _generate(model, *pad_batch(batch, tokenizer.pad_token_id, side="left"), kw).ids.tolist()
        copies = params.n if params.strategy != "greedy" else 1
        for i in range(len(batch)):
            rows = new[i * copies:(i + 1) * copies]
            responses = [trim_response(r, tokenizer.eos_token_id, tokenizer.pad_token_id)[0] for r in rows]
            if params.strategy == "greedy":
                responses = responses * params.n
            out.append(responses)
    model.train(was_training)
    return out


@torch.no_grad()
def generate_rows(model, tokenizer, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, params: SamplingParams,
                  batch_size: int = 0, *, with_logits: bool = False, with_hidden: bool = False) -> Generated:
    """One response per row of a left-padded prompt batch ``[N, P]`` (PPO's rollout, whose rows
    already repeat each prompt once per sample), with the KV cache.

    In chunks of ``batch_size`` rows (0: all at once), drawing from torch's global RNG as it is
    (seed it before the call). ``with_logits`` / ``with_hidden`` keep what generation computed
    anyway, so that the policy's log-probs and a value head need no second pass over the
    sequences. The chunks are right-padded to the longest (ids with the pad token, the rest 0).
    """
    kw = generation_kwargs(replace(params, n=1), tokenizer)
    step = batch_size or prompt_ids.shape[0]
    chunks = [_generate(model, prompt_ids[i:i + step], prompt_mask[i:i + step].long(), kw,
                        with_logits=with_logits, with_hidden=with_hidden)
              for i in range(0, prompt_ids.shape[0], step)]
    width = max(c.ids.shape[1] for c in chunks)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def stack(parts: list, value: int = 0) -> torch.Tensor | None:
        if any(p is None for p in parts):
            return None
        return torch.cat([F.pad(p, (0, 0) * (p.dim() - 2) + (0, width - p.shape[1]), value=value) for p in parts])

    return Generated(stack([c.ids.cpu() for c in chunks], pad), stack([c.logits for c in chunks]),
                     stack([c.hidden for c in chunks]))


DecodingDtype = Literal["auto", "float32", "bfloat16"]
DECODING_DTYPES = get_args(DecodingDtype)
"""The values :func:`decoding_copy` accepts."""


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX on x86, BF16 on Arm)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return bool({"avx512_bf16", "amx_bf16", "bf16"} & set(flags))


def decoding_copy(model, dtype: str = "auto"):
    """The model to sample from: ``model`` itself, or a bfloat16 copy of it.

    Decoding reads every weight once per token for a few rows, so it is bound by memory and
    bfloat16 halves the bytes: on this project's 2-core AVX512-BF16 CPU, SmolLM2-135M samples
    16 rows x 32 tokens in 3.2 s instead of 5.2 s and 64 rows in 12.2 s instead of 24.1 s
    (measured, docs/demo.md). The copy's log-probs differ from the original's by bfloat16 rounding,
    so measure log-probs and KL with the original; the samples are those of the bfloat16 copy.
    ``dtype``: ``"float32"`` (no copy), ``"bfloat16"``, or ``"auto"`` (bfloat16 for a float32 model
    on a CPU with native bfloat16 instructions, else no copy).
    """
    if dtype not in DECODING_DTYPES:
        raise ValueError(f"unknown decoding dtype {dtype!r} (auto, float32 or bfloat16)")
    current = next(model.parameters()).dtype
    on_cpu = next(model.parameters()).device.type == "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if current == torch.float32 and on_cpu and cpu_has_native_bf16() else "float32"
    if dtype == "float32" or current == torch.bfloat16:
        return model
    return copy.deepcopy(model).to(torch.bfloat16).eval()


def decode_response(tokenizer, tokens: list[int], stop: list[str] | None = None) -> str:
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    return apply_stop(text, stop or []).strip()


def generate_chat(model, tokenizer, prompts: list, params: SamplingParams, batch_size: int = 8,
                  max_prompt_length: int | None = None) -> list[list[str]]:
    """``params.n`` completion strings for each prompt (a string or a list of messages)."""
    prompt_ids = [encode_prompt(tokenizer, p, max_prompt_length) for p in prompts]
    responses = generate_ids(model, tokenizer, prompt_ids, params, batch_size)
    return [[decode_response(tokenizer, r, params.stop) for r in rows] for rows in responses]


FinishReason = Literal["stop", "length"]


@dataclass
class Completion:
    """One response with the bookkeeping an API reports.

    ``token_ids`` are the tokens the model generated for it (the EOS token included when it
    ended there; cut after the token that completed a stop string); ``finish_reason`` is
    ``"stop"`` (EOS, a stop string, or the row ended early) or ``"length"`` (the token limit).
    """

    text: str
    token_ids: list[int]
    finish_reason: FinishReason

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


def _find_stop(text: str, stop: list[str]) -> bool:
    return any(s and s in text for s in stop)


def describe_response(tokenizer, tokens: list[int], max_new_tokens: int, stop: list[str] | None = None,
                      strip: bool = True) -> Completion:
    """Text, generated tokens and finish reason of one response (as cut by :func:`generate_ids`).

    ``strip=True`` gives exactly :func:`decode_response`'s text (what :func:`generate_chat`
    returns); ``strip=False`` keeps the whitespace (raw text continuation).
    """
    stop = [s for s in (stop or []) if s]
    raw = tokenizer.decode(tokens, skip_special_tokens=True)
    text = apply_stop(raw, stop)
    if text != raw:  # a stop string: count the tokens up to the one that completed it
        k = len(tokens)
        while k > 1 and _find_stop(tokenizer.decode(tokens[:k - 1], skip_special_tokens=True), stop):
            k -= 1
        return Completion(text.strip() if strip else text, list(tokens[:k]), "stop")
    ended = bool(tokens) and tokens[-1] == tokenizer.eos_token_id
    reason: FinishReason = "stop" if ended or len(tokens) < max_new_tokens else "length"
    return Completion(text.strip() if strip else text, list(tokens), reason)


def generate_completions(model, tokenizer, prompts: list, params: SamplingParams, batch_size: int = 8,
                         max_prompt_length: int | None = None, strip: bool = True) -> list[list[Completion]]:
    """Like :func:`generate_chat`, with token counts and finish reasons (:class:`Completion`)."""
    prompt_ids = [encode_prompt(tokenizer, p, max_prompt_length) for p in prompts]
    responses = generate_ids(model, tokenizer, prompt_ids, params, batch_size)
    return [[describe_response(tokenizer, r, params.max_new_tokens, params.stop, strip) for r in rows]
            for rows in responses]
