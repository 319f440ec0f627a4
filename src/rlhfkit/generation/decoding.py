"""Decoding strategies: rlhfkit's one sampling path, over transformers' models and logits processors.

transformers does the model, the KV cache, the logits processors (temperature, top-k, top-p,
min-p, repetition penalty) and beam search; this module renders chat prompts, batches them with
left padding, seeds the sampler, cuts responses at EOS or a stop string, and returns plain
records. Every sampler of rlhfkit goes through it: :func:`generate_ids` (generate, best-of-N,
rejection sampling, the server, evaluation) and :func:`generate_rows` (PPO's rollout, which also
keeps the logits and hidden states that generation computed).

Sampling and greedy decoding run :func:`decode_loop`, a lean loop over the model's forward with
its KV cache, instead of ``model.generate``: on this project's 2-core CPU, SmolLM2-135M decoding
16 rows spends ~13 ms of each token step in ``torch.multinomial`` (an exponential draw for each of
the 49,152 vocabulary entries of each row) and ~10 ms in ``generate``'s per-step bookkeeping,
against a 33 ms bfloat16 forward; :func:`draw_tokens` runs the same exponential race from uniform
draws, ~4x cheaper (bench/decoding_speed.py has the measurements).
Beam search stays ``model.generate``.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
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


def logits_processors(params: SamplingParams):
    """transformers' processors for ``params``, in ``generate``'s order: the repetition penalty, then
    (sampling only) temperature, top-k, top-p, min-p."""
    from transformers import (
        LogitsProcessorList,
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    out = LogitsProcessorList()
    if params.repetition_penalty != 1.0:
        out.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    if params.strategy == "sample":
        if params.temperature != 1.0:
            out.append(TemperatureLogitsWarper(params.temperature))
        if params.top_k:
            out.append(TopKLogitsWarper(params.top_k))
        if params.top_p < 1.0:
            out.append(TopPLogitsWarper(params.top_p))
        if params.min_p:
            out.append(MinPLogitsWarper(params.min_p))
    return out


def draw_tokens(scores: torch.Tensor) -> torch.Tensor:
    """One token per row ``[B]`` from softmax(``scores`` [B, V]): the exponential race.

    argmax_i p_i / E_i with E_i ~ Exp(1) independent picks token i with probability exactly p_i
    (the algorithm of ``torch.multinomial`` for one sample); E_i = −log U_i from uniforms: the
    whole draw takes ~4× less time than ``torch.multinomial`` (3.0 ms vs 12.3 ms per step for 16
    rows of SmolLM2's 49,152-token vocabulary, one thread; bench/decoding_speed.py). A token of probability
    0 (masked by top-k/top-p/min-p) is never drawn. Unlike an inverse-CDF draw, the race keeps the
    same token under a small perturbation of the probabilities unless two candidates nearly tie
    (a float32 and a bfloat16 run sample alike), as torch.multinomial does. Uses torch's global RNG.
    """
    probs = torch.softmax(scores.float(), dim=-1)
    return (probs / -torch.rand_like(probs).log()).argmax(dim=-1)


def _keeps_last_logits(model) -> dict:
    """``{"logits_to_keep": 1}`` when the causal LM's forward takes it (the prefill then computes
    the LM head for the last position only), else nothing."""
    import inspect

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(inner.forward).parameters else {}


def _prefill(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, copies: int, with_hidden: bool):
    """The prompts' forward, once per prompt: (cache, last logits, last hidden or None, positions), every
    row repeated ``copies`` times (the cache too: transformers' ``Cache.batch_repeat_interleave``)."""
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True,
                output_hidden_states=with_hidden, **_keeps_last_logits(model))
    logits, hidden = out.logits[:, -1], out.hidden_states[-1][:, -1] if with_hidden else None
    if copies > 1:
        out.cache.batch_repeat_interleave(copies)
        logits, positions = logits.repeat_interleave(copies, 0), positions.repeat_interleave(copies, 0)
        hidden = hidden.repeat_interleave(copies, 0) if with_hidden else None
    return out.cache, logits, hidden, positions


@torch.no_grad()
def decode_loop(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, params: SamplingParams,
                eos_ids: Sequence[int], pad_id: int, stopping_criteria=None, *, copies: int = 1,
                with_logits: bool = False, with_hidden: bool = False) -> Generated:
    """Sample (or take the argmax of) up to ``params.max_new_tokens`` tokens for each row of a
    left-padded batch, with the KV cache: one prefill, then one single-token forward per step.
    ``copies``: responses per prompt row (consecutive rows of the result); the prompt is encoded
    once and its cache repeated, not encoded once per response.

    What ``model.generate`` does for these strategies, step for step: positions count real tokens
    only, ``logits_processors(params)`` see the sequence so far, a row that produced an EOS (or
    that ``stopping_criteria(ids, scores)`` ended) continues with the pad token, and decoding stops
    when every row has ended. No forward is run after the last step.
    """
    device = next(model.parameters()).device
    processors = logits_processors(params)
    eos = torch.tensor(list(eos_ids), dtype=torch.long, device=device)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device).long()
    cache, last, last_hidden, positions = _prefill(model, input_ids, attention_mask, copies, with_hidden)
    rows, prompt_len, limit = input_ids.shape[0] * copies, input_ids.shape[1], params.max_new_tokens
    ids = torch.cat([input_ids.repeat_interleave(copies, 0), torch.full((rows, limit), pad_id, device=device)], 1)
    mask = torch.cat([attention_mask.repeat_interleave(copies, 0), torch.ones(rows, limit, device=device).long()], 1)
    running = torch.ones(rows, dtype=torch.bool, device=device)
    logits, hidden = [], []
    for step in range(limit):
        end, last = prompt_len + step, last.float()
        logits += [last] if with_logits else []
        hidden += [last_hidden] if with_hidden else []
        scores = processors(ids[:, :end], last)
        token = draw_tokens(scores) if params.strategy == "sample" else scores.argmax(-1)
        ids[:, end] = torch.where(running, token, pad_id)
        running &= ~torch.isin(ids[:, end], eos)
        if stopping_criteria is not None:
            running &= ~stopping_criteria(ids[:, :end + 1], scores)
        if step == limit - 1 or not running.any():
            break
        out = model(input_ids=ids[:, end:end + 1], attention_mask=mask[:, :end + 1],
                    position_ids=positions[:, -1:] + 1 + step, cache=cache, use_cache=True,
                    output_hidden_states=with_hidden)
        cache, last = out.cache, out.logits[:, -1]
        last_hidden = out.hidden_states[-1][:, -1] if with_hidden else None
    return Generated(ids[:, prompt_len:prompt_len + step + 1], torch.stack(logits, 1) if with_logits else None,
                     torch.stack(hidden, 1) if with_hidden else None)


def _generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, kw: dict, *, with_logits: bool = False,
              with_hidden: bool = False) -> Generated:
    """One ``model.generate`` call on a left-padded batch (beam search: the only one in rlhfkit)."""
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


def _pad_id(tokenizer) -> int:
    """The token a row continues with after it has ended: the pad token, or EOS without one."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _decode(model, tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor, params: SamplingParams,
            stopping_criteria: list | None = None, *, with_logits: bool = False, with_hidden: bool = False
            ) -> Generated:
    """New tokens for a left-padded batch: ``params.n`` rows per prompt row (one for greedy), consecutive.
    Beam search runs ``model.generate``; sampling and greedy run :func:`decode_loop`."""
    if params.strategy == "beam":
        kw = generation_kwargs(params, tokenizer)
        if stopping_criteria:
            from transformers import StoppingCriteriaList

            kw["stopping_criteria"] = StoppingCriteriaList(list(stopping_criteria))
        return _generate(model, input_ids, attention_mask, kw, with_logits=with_logits, with_hidden=with_hidden)
    copies = params.n if params.strategy == "sample" else 1
    pad = _pad_id(tokenizer)
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    criteria = None
    if stopping_criteria:
        def criteria(ids, scores):  # any criterion ends a row, as in generate's StoppingCriteriaList
            return torch.stack([torch.as_tensor(c(ids, scores), device=ids.device) for c in stopping_criteria]).any(0)
    return decode_loop(model, input_ids, attention_mask, params, eos, pad, criteria, copies=copies,
                       with_logits=with_logits, with_hidden=with_hidden)


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
    starts = range(0, len(prompt_ids), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=progress, dynamic_ncols=True)
    for start in starts:
        batch = prompt_ids[start:start + batch_size]
        if params.seed is not None:
            torch.manual_seed(params.seed + start)
        new = _decode(model, tokenizer, *pad_batch(batch, tokenizer.pad_token_id, side="left"), params,
                      stopping_criteria).ids.tolist()
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
    """``params.n`` responses to each row of a left-padded prompt batch ``[M, P]``, as ``M·n`` rows
    (the responses to a prompt consecutive: PPO's rollout), with the KV cache; each prompt is
    encoded once.

    In chunks of ``batch_size`` prompts (0: all at once), drawing from torch's global RNG as it is
    (seed it before the call). ``with_logits`` / ``with_hidden`` keep what generation computed
    anyway, so that the policy's log-probs and a value head need no second pass over the
    sequences. The chunks are right-padded to the longest (ids with the pad token, the rest 0).
    """
    step = batch_size or prompt_ids.shape[0]
    chunks = [_decode(model, tokenizer, prompt_ids[i:i + step], prompt_mask[i:i + step].long(), params,
                      with_logits=with_logits, with_hidden=with_hidden)
              for i in range(0, prompt_ids.shape[0], step)]
    if params.strategy == "greedy" and params.n > 1:  # one greedy response stands for its n copies
        chunks = [Generated(*(None if t is None else t.repeat_interleave(params.n, 0) for t in c)) for c in chunks]
    width = max(c.ids.shape[1] for c in chunks)
    pad = _pad_id(tokenizer)

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


SAMPLE_DTYPE_HELP = ("Precision of the copy that rollouts are sampled from: float32 (the policy itself), bfloat16 "
                     "(a copy refreshed from the policy before each rollout, about three times faster to decode "
                     "here) or auto (bfloat16 on a CPU with native bfloat16). The log-probs, the ratio and the KL "
                     "are always the policy's own, recomputed on the samples.")


class DecodingCopy:
    """What rollouts sample from: the policy itself, or a :func:`decoding_copy` of it whose trainable
    weights are copied from the policy (rounded to bfloat16) before each rollout (:meth:`current`).

    Copying 135M weights takes ~0.1 s; sampling from the copy saves seconds per rollout (docs/ppo.md,
    "Speed"). The samples then come from the bfloat16 copy, so the rollout recomputes the policy's
    log-probs on them (``rollout(..., sampler=...)``).
    """

    def __init__(self, model, dtype: str = "auto"):
        self.model = model
        self.copy = decoding_copy(model, dtype)

    @property
    def is_copy(self) -> bool:
        return self.copy is not self.model

    @torch.no_grad()
    def current(self):
        """The model to sample from now (the copy refreshed with the policy's current weights)."""
        if self.is_copy:
            target = dict(self.copy.named_parameters())
            for name, weight in self.model.named_parameters():
                if weight.requires_grad:
                    target[name].copy_(weight)
        return self.copy


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
