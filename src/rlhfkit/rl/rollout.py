"""The rollout: sample responses, then read their log-probs and values in no-grad passes.

:func:`rollout` returns a :class:`Rollout`, an immutable record that every later phase
(scoring, reward shaping, advantages, the update) reads and none modifies; :func:`score` returns
a copy with the reward source's scores filled in.

Tensor layout (N samples, P prompt columns, R response columns)::

    prompt_ids     [N, P]  left-padded prompt tokens (the chat template applied)
    response_ids   [N, R]  sampled tokens, right-padded after EOS
    response_mask  [N, R]  the *real* response tokens: up to and including the first EOS;
                           never the padding or what follows EOS
    logprobs       [N, R]  log π(y_t | x, y_<t) at the sampling temperature (0 off the mask)
    ref_logprobs   [N, R]  the same under the reference policy
    values         [N, R]  V(x, y_<t) (None without a value function)

Samples of one prompt are consecutive (``group``), as the RLOO / GRPO baselines expect.

Speed: sampling goes through the decoding layer (:func:`rlhfkit.generation.decoding.generate_rows`:
its decoding loop with the KV cache), which keeps the logits and hidden states generation
computed, so the policy's log-probs (:func:`rlhfkit.losses.token_logps`), entropies and value-head
values need no pass of their own; one trunk pass gives the reference (the same weights with the
LoRA adapters disabled, or a frozen copy), one more a separate critic's values. Those passes and
the update's (:func:`forward_response`) run on one packed row for a Llama-family model
(:mod:`rlhfkit.models.packed`, as DPO): the samples of a prompt share one copy of it, no padding
goes through a matmul, and the vocabulary projection runs only where a response token is
predicted, fused with the log-softmax. Any other model runs the left-padded batch, without the
columns that are padding in every row.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from rlhfkit.data.chat import encode_prompt
from rlhfkit.data.collate import pad_batch
from rlhfkit.generation.decoding import Generated, SamplingParams, decode_response, generate_rows
from rlhfkit.losses import entropy_from_logits, token_logps
from rlhfkit.models.packed import Group, pack_groups, supports_packing
from rlhfkit.rl.value import ActorCritic

__all__ = ["Rollout", "rollout", "score", "response_mask", "position_ids", "forward_response",
           "reference_logprobs", "critic_values", "ResponseOutput"]


@dataclass(frozen=True)
class Rollout:
    """One batch of sampled responses and everything measured on them (see the module doc)."""

    prompts: tuple               # the raw prompts (str or messages), one per sample
    completions: tuple           # decoded response text (special tokens dropped), one per sample
    prompt_ids: Tensor           # [N, P] long, left-padded
    prompt_mask: Tensor          # [N, P] bool
    response_ids: Tensor         # [N, R] long, right-padded
    response_mask: Tensor        # [N, R] bool: real tokens, through the first EOS
    logprobs: Tensor             # [N, R] policy log-probs at sampling time
    ref_logprobs: Tensor         # [N, R] reference log-probs
    values: Tensor | None        # [N, R] value estimates, or None
    entropy: Tensor              # [N, R] entropy of the policy's next-token distribution
    has_eos: Tensor              # [N] bool: the response ended with EOS
    group: Tensor                # [N] long: index of the prompt in the batch
    scores: Tensor | None = None  # [N] the reward source's scores (set by :func:`score`)

    @property
    def num_samples(self) -> int:
        return self.response_ids.shape[0]

    @property
    def lengths(self) -> Tensor:
        """Real response tokens per sample ``[N]``."""
        return self.response_mask.sum(dim=1)

    def select(self, index: Tensor | Sequence[int]) -> Rollout:
        """The samples at ``index`` (a minibatch), as a new record."""
        index = torch.as_tensor(index, dtype=torch.long)
        picked = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                picked[f.name] = value[index]
            elif isinstance(value, tuple):
                picked[f.name] = tuple(value[i] for i in index.tolist())
            else:
                picked[f.name] = value
        return Rollout(**picked)


def response_mask(response_ids: Tensor, eos_token_id: int | Sequence[int] | None) -> tuple[Tensor, Tensor]:
    """``(mask [N, R] bool, has_eos [N] bool)``: True up to and including the first EOS.

    Rows without an EOS are real to the end. Padding only ever follows an EOS, so it is never
    real, whatever the pad token is (it may even equal EOS); a pad-token id *sampled* before
    the EOS is a real token.
    """
    eos_ids = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    is_eos = torch.zeros_like(response_ids, dtype=torch.bool)
    for e in eos_ids:
        is_eos |= response_ids == e
    has_eos = is_eos.any(dim=1)
    # positions after the first EOS: an EOS strictly before them
    eos_before = (torch.cumsum(is_eos.long(), dim=1) - is_eos.long()) > 0
    return ~eos_before, has_eos


def position_ids(attention_mask: Tensor) -> Tensor:
    """Positions counting real tokens only (left padding does not shift them), as ``generate``."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


class ResponseOutput(NamedTuple):
    logprobs: Tensor              # [N, R], 0 off the mask
    values: Tensor | None         # [N, R], 0 off the mask
    entropy: Tensor | None        # [N, R], 0 off the mask


def _logps_and_entropy(logits: Tensor, targets: Tensor, real: Tensor, temperature: float,
                       with_entropy: bool) -> tuple[Tensor, Tensor | None]:
    """Log-probs (and the entropy) of softmax(logits / τ) at the real positions, 0 elsewhere."""
    zero = torch.zeros((), device=logits.device)
    logprobs = torch.where(real, token_logps(logits, targets, temperature), zero)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = torch.where(real, entropy_from_logits(logits.detach().float() / temperature), zero)
    return logprobs, entropy


class _Packed(NamedTuple):
    ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    start: int                    # column of the first response token
    width: int                    # response columns kept (the last real one included)


def _pack(prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor, mask: Tensor, device) -> _Packed:
    """Prompt and response side by side, without the columns that are padding in every row."""
    real_prompt_cols = prompt_mask.any(dim=0).nonzero()
    first = int(real_prompt_cols[0]) if len(real_prompt_cols) else prompt_mask.shape[1] - 1
    real_response_cols = mask.any(dim=0).nonzero()
    width = int(real_response_cols[-1]) + 1 if len(real_response_cols) else 1
    width = min(width, response_ids.shape[1])
    ids = torch.cat([prompt_ids[:, first:], response_ids[:, :width]], dim=1).to(device)
    attn = torch.cat([prompt_mask[:, first:], mask[:, :width]], dim=1).to(device).long()
    return _Packed(ids, attn, position_ids(attn), prompt_ids.shape[1] - first, width)


def _pad_to(x: Tensor | None, columns: int) -> Tensor | None:
    """Zeros appended on the right up to ``columns`` (the response columns cut by :func:`_pack`)."""
    return x if x is None or x.shape[1] == columns else F.pad(x, (0, columns - x.shape[1]))


def forward_response(model, prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor, mask: Tensor,
                     temperature: float = 1.0, *, with_values: bool = True, with_entropy: bool = False,
                     packed: bool | None = None) -> ResponseOutput:
    """Log-probs (and values, entropy) of the response tokens in one pass of ``model``.

    ``model`` is an :class:`~rlhfkit.rl.value.ActorCritic` (or what ``accelerator.prepare``
    made of it). Logits are divided by ``temperature``: the log-probs are those of the
    distribution the sampler drew from. Gradients flow unless the caller disables them.

    ``packed=None`` picks the packed path (:func:`_forward_packed`: one row, each prompt once, no
    padding) where it applies: a Llama-family model, and each response mask a prefix of its row
    (as :func:`response_mask` makes them); else the padded batch. Both give the same numbers (to
    float rounding).
    """
    if packed is None:
        packed = _packable(_unwrap(model), prompt_mask, mask, with_values)
    forward = _forward_packed if packed else _forward_padded
    return forward(model, prompt_ids, prompt_mask, response_ids, mask, temperature, with_values, with_entropy)


def _forward_padded(model, prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor, mask: Tensor,
                    temperature: float, with_values: bool, with_entropy: bool) -> ResponseOutput:
    """:func:`forward_response` on the left-padded batch (``ActorCritic.forward_padded``)."""
    device = next(model.parameters()).device
    cut = _pack(prompt_ids, prompt_mask, response_ids, mask, device)
    logits, values = model(cut.ids, cut.attention_mask, cut.position_ids, cut.start, cut.width, with_values)
    real = mask[:, :cut.width].to(device)
    targets = response_ids[:, :cut.width].to(device)
    logprobs, entropy = _logps_and_entropy(logits, targets, real, temperature, with_entropy)
    zero = torch.zeros((), device=device)
    if values is not None:
        values = torch.where(real, values.float(), zero)
    columns = response_ids.shape[1]
    return ResponseOutput(_pad_to(logprobs, columns), _pad_to(values, columns), _pad_to(entropy, columns))


def _packable(actor: ActorCritic, prompt_mask: Tensor, mask: Tensor, with_values: bool) -> bool:
    """Whether :func:`forward_response`'s packed path applies (:func:`_rows_pack`), to the policy and the critic."""
    models = [actor.causal_lm()] + ([actor.critic.trunk] if with_values and actor.critic is not None else [])
    return _rows_pack(models, prompt_mask, mask)


def _rows_pack(models: list, prompt_mask: Tensor, mask: Tensor) -> bool:
    """Llama-family ``models``, every prompt non-empty, every response mask a prefix of its row
    (real tokens, then only padding)."""
    if not all(supports_packing(m) for m in models):
        return False
    lengths = mask.sum(dim=1)
    prefix = torch.arange(mask.shape[1], device=mask.device) < lengths[:, None]
    return bool(prompt_mask.any(dim=1).all()) and torch.equal(mask, prefix)


def response_groups(prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor,
                    lengths: Tensor) -> tuple[list[Group], list[int]]:
    """The rows as :class:`~rlhfkit.models.packed.Group` s, and the row of each completion in
    group-major order: the rows with the same (real) prompt tokens share one group, wherever they
    sit in the batch (a shuffled minibatch of GRPO / RLOO samples still encodes each prompt once),
    in the order of their first row; each completion the first ``lengths[i]`` response tokens of its row."""
    rows_of: dict[tuple[int, ...], list[int]] = {}
    for i, (ids, real) in enumerate(zip(prompt_ids, prompt_mask)):
        rows_of.setdefault(tuple(ids[real].tolist()), []).append(i)
    counts = lengths.tolist()
    groups = [Group(list(prompt), [response_ids[i, :counts[i]].tolist() for i in rows])
              for prompt, rows in rows_of.items()]
    return groups, [i for rows in rows_of.values() for i in rows]


def _forward_packed(model, prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor, mask: Tensor,
                    temperature: float, with_values: bool, with_entropy: bool) -> ResponseOutput:
    """:func:`forward_response` on one packed row (``ActorCritic.forward_packed``, called through
    ``model`` for DDP)."""
    def run(packed):
        return model(packed=packed, temperature=temperature, with_values=with_values, with_entropy=with_entropy)

    return ResponseOutput(*_on_packed_row(run, prompt_ids, prompt_mask, response_ids, mask))


def _on_packed_row(run, prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor,
                   mask: Tensor) -> list[Tensor | None]:
    """``run(packed)``'s per-token outputs ([n] each, or None) on the rows packed
    (:func:`response_groups`), scattered back to ``[N, R]`` in row order, 0 off the mask."""
    groups, order = response_groups(prompt_ids, prompt_mask, response_ids, mask.sum(dim=1))
    outputs = run(pack_groups(groups))
    device = outputs[0].device
    order = torch.tensor(order, device=device)
    real = mask.to(device)[order]  # packed order: completion after completion (group-major), each over its prefix
    back = torch.empty_like(order)
    back[order] = torch.arange(len(order), device=device)
    zeros = torch.zeros(real.shape, device=device)
    return [None if flat is None else zeros.masked_scatter(real, flat.float())[back] for flat in outputs]


@torch.no_grad()
def critic_values(critic, prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor, mask: Tensor) -> Tensor:
    """Values ``[N, R]`` of a separate :class:`~rlhfkit.rl.value.Critic` (one pass of its trunk,
    packed as :func:`forward_response`'s where that applies)."""
    if _rows_pack([critic.trunk], prompt_mask, mask):
        return _on_packed_row(lambda packed: [critic.packed_values(packed)], prompt_ids, prompt_mask, response_ids,
                              mask)[0]
    device = next(critic.parameters()).device
    packed = _pack(prompt_ids, prompt_mask, response_ids, mask, device)
    hidden = critic.hidden(packed.ids, packed.attention_mask, packed.position_ids)
    window = hidden[:, packed.start - 1:packed.start - 1 + packed.width]
    values = torch.where(mask[:, :packed.width].to(device), critic(window).float(), 0.0)
    return _pad_to(values, response_ids.shape[1])


def _unwrap(model) -> ActorCritic:
    while not isinstance(model, ActorCritic) and hasattr(model, "module"):
        model = model.module
    return model


@torch.no_grad()
def reference_logprobs(model, reference, prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor,
                       mask: Tensor, temperature: float = 1.0) -> Tensor:
    """Log-probs under the reference: ``reference`` (a frozen model), or, when it is None, the
    LoRA policy with its adapters disabled (peft's ``disable_adapter()``: no second copy)."""
    if reference is None:
        actor = _unwrap(model)
        if not actor.is_peft:
            raise ValueError("a policy without LoRA adapters needs a separate reference model")
        with actor.policy.disable_adapter():
            return forward_response(actor, prompt_ids, prompt_mask, response_ids, mask, temperature,
                                    with_values=False).logprobs
    if not isinstance(reference, ActorCritic):
        reference = ActorCritic(reference)
    return forward_response(reference, prompt_ids, prompt_mask, response_ids, mask, temperature,
                            with_values=False).logprobs


class _Sampled(NamedTuple):
    prompt_ids: Tensor            # [N, P] left-padded
    prompt_mask: Tensor           # [N, P] bool
    response_ids: Tensor          # [N, R]
    mask: Tensor                  # [N, R] bool: real response tokens
    has_eos: Tensor               # [N] bool
    generated: Generated          # with generation's logits (and hidden states) unless recomputed


def _sample(actor: ActorCritic, sampler, tokenizer, prompts: Sequence, params: SamplingParams,
            max_prompt_length: int | None, batch_size: int, keep_outputs: bool) -> _Sampled:
    """``params.n`` responses per prompt from ``sampler``, one row each (samples of a prompt consecutive)."""
    encoded = [encode_prompt(tokenizer, p, max_prompt_length) for p in prompts]
    prompt_ids, prompt_mask = pad_batch(encoded, tokenizer.pad_token_id, side="left")
    chunk = max(1, batch_size // params.n) if batch_size else 0  # rows -> prompts
    generated = generate_rows(sampler, tokenizer, prompt_ids, prompt_mask.bool(), params, chunk,
                              with_logits=keep_outputs, with_hidden=keep_outputs and actor.value_head is not None)
    prompt_ids, prompt_mask = (t.repeat_interleave(params.n, 0) for t in (prompt_ids, prompt_mask.bool()))
    mask, has_eos = response_mask(generated.ids, tokenizer.eos_token_id)
    return _Sampled(prompt_ids, prompt_mask, generated.ids, mask, has_eos, generated)


def _measure(model, actor: ActorCritic, reference, sampled: _Sampled, rows: slice, temperature: float,
             recompute: bool) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """(log-probs, entropy, values or None, reference log-probs) of the samples ``rows``, on the CPU."""
    args = (sampled.prompt_ids[rows], sampled.prompt_mask[rows], sampled.response_ids[rows], sampled.mask[rows],
            temperature)
    if recompute:
        out = forward_response(model, *args, with_values=actor.has_values, with_entropy=True)
        logprobs, entropy, values = out.logprobs, out.entropy, out.values
    else:
        logits = sampled.generated.logits[rows]
        real = sampled.mask[rows].to(logits.device)
        logprobs, entropy = _logps_and_entropy(logits, sampled.response_ids[rows].to(logits.device), real,
                                               temperature, with_entropy=True)
        values = None
        if actor.value_head is not None:
            values = torch.where(real, actor.value_head(sampled.generated.hidden[rows]).float(), 0.0)
        elif actor.critic is not None:
            values = critic_values(actor.critic, *args[:4])
    ref = reference_logprobs(model, reference, *args)
    return logprobs.cpu(), entropy.cpu(), None if values is None else values.cpu(), ref.cpu()


@torch.no_grad()
def rollout(model, reference, tokenizer, prompts: Sequence, params: SamplingParams, *,
            max_prompt_length: int | None = None, batch_size: int = 0, recompute: bool | None = None,
            sampler=None, timings: dict | None = None) -> Rollout:
    """Sample ``params.n`` responses per prompt and measure them (no gradients).

    ``model``: an :class:`ActorCritic` (policy plus optional value function); ``reference``: a
    frozen causal LM (or ActorCritic), or None for "the LoRA policy with adapters disabled".
    ``prompts``: strings or message lists (the chat template is applied). Prompts longer than
    ``max_prompt_length`` tokens keep their last tokens. ``batch_size`` bounds the rows per
    ``generate`` call and per forward pass (0: all at once). Sampling draws from torch's global
    RNG (:func:`rlhfkit.generation.decoding.generate_rows`): seed it before the call for a
    reproducible rollout.

    Passes: the policy's log-probs, entropy and value-head values come from the logits and
    hidden states that ``generate`` computed (in float32 they equal a fresh forward pass to
    ~1e-6); one pass of the reference follows, and one of a separate critic if there is one.
    ``recompute=True`` (the default for a policy that is not float32, or that runs under autocast
    (--bf16), whose cached decoding drifts further from a full pass) recomputes them with a forward
    pass instead, the pass the update makes: the PPO ratio then starts at 1. ``sampler``: the model
    to sample from, when not the policy itself (a bfloat16
    :class:`~rlhfkit.generation.decoding.DecodingCopy` of it); its samples are always measured with
    the policy (``recompute``). The caller's autocast
    (``Run.autocast``) covers every pass here, sampling included.
    ``timings`` (optional) receives the seconds spent sampling (``generation``) and in the
    forward passes (``forward``).
    """
    actor = _unwrap(model)
    sampler = actor.policy if sampler is None else sampler
    if sampler is not actor.policy:
        recompute = True
    elif recompute is None:
        weight = next(actor.policy.parameters())
        recompute = weight.dtype != torch.float32 or torch.is_autocast_enabled(weight.device.type)
    was_training = actor.training
    actor.eval()
    t0 = time.perf_counter()
    sampled = _sample(actor, sampler, tokenizer, prompts, params, max_prompt_length, batch_size,
                      keep_outputs=not recompute)
    t1 = time.perf_counter()
    n = sampled.response_ids.shape[0]
    step = batch_size or n
    parts = [_measure(model, actor, reference, sampled, slice(i, i + step), params.temperature, recompute)
             for i in range(0, n, step)]
    logprobs, entropy, values, ref = (list(column) for column in zip(*parts))
    t2 = time.perf_counter()
    actor.train(was_training)
    if timings is not None:
        timings["generation"] = t1 - t0
        timings["forward"] = t2 - t1

    response_ids, mask = sampled.response_ids, sampled.mask
    return Rollout(
        prompts=tuple(p for p in prompts for _ in range(params.n)),
        completions=tuple(decode_response(tokenizer, row[m].tolist()) for row, m in zip(response_ids, mask)),
        prompt_ids=sampled.prompt_ids,
        prompt_mask=sampled.prompt_mask,
        response_ids=response_ids,
        response_mask=mask,
        logprobs=torch.cat(logprobs),
        ref_logprobs=torch.cat(ref),
        values=None if values[0] is None else torch.cat(values),
        entropy=torch.cat(entropy),
        has_eos=sampled.has_eos,
        group=torch.arange(len(prompts)).repeat_interleave(params.n),
    )


def score(batch: Rollout, reward_fn: Callable[[list, list], list]) -> Rollout:
    """A copy of ``batch`` with ``scores`` [N] from ``reward_fn(prompts, completions)``."""
    scores = torch.tensor(reward_fn(list(batch.prompts), list(batch.completions)), dtype=torch.float32)
    if scores.shape != (batch.num_samples,):
        raise ValueError(f"the reward returned {tuple(scores.shape)} scores for {batch.num_samples} samples")
    return dataclasses.replace(batch, scores=scores)
