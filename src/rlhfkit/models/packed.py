"""Log-probabilities of several completions that share a prompt, in one padding-free forward.

DPO scores a chosen and a rejected answer to the same prompt; rejection sampling and KL
estimates score N samples of one prompt. A *group* is one prompt and its K completions. The
fast path lays every group of a batch out in one row, with no padding::

    [ prompt_1 | completion_1,1 | completion_1,2 | prompt_2 | completion_2,1 | ... ]

- the prompt is encoded once per group, not once per completion;
- position ids restart after the prompt for each completion, so completion k sees exactly the
  positions it would see alone after the prompt (rotary embeddings depend only on them);
- attention gathers the row into one causal sequence per completion (its prompt's keys and
  values, computed once, then its own tokens), so a completion attends to its prompt and to
  its own earlier tokens, never to a sibling; the attention function is registered with
  transformers' ``AttentionInterface`` and selected only for this forward;
- the LM head is applied only at the positions that predict a scored token
  (``logits_to_keep`` with an index tensor), and for a plain Linear head it is fused with the
  log-probabilities (:class:`_HeadLogps`, equal to :func:`rlhfkit.losses.token_logps` of the
  head's logits, which any other head uses): one [n, V] buffer for the n scored tokens holds
  the logits, then in place the softmax, then its gradient; no log-softmax, no logits for
  prompts or padding.

Every projection and MLP matmul then runs on exactly the real tokens. The fast path covers the
Llama family (Llama, Mistral, Qwen2/3, SmolLM); any other model falls back to a right-padded
batch of prompt+completion rows (:func:`padded_forward`), which gives the same numbers.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rlhfkit.data.chat import Encoded
from rlhfkit.data.collate import collate
from rlhfkit.losses import token_logps
from rlhfkit.models.loading import attention_implementation

ATTENTION_NAME = "rlhfkit_packed_groups"
PACKED_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3"}


@dataclass
class Group:
    """One prompt and the completions that share it (token ids).

    ``scored[k][j]`` says whether token j of completion k counts in its log-probability (True
    for assistant tokens; False for e.g. a tool turn inside a multi-turn completion).
    """

    prompt: list[int]
    completions: list[list[int]]
    scored: list[list[bool]] | None = None

    def __post_init__(self):
        if not self.prompt:
            raise ValueError("a group needs at least one prompt token "
                             "(the first completion token is predicted from it)")
        if not self.completions:
            raise ValueError("a group needs at least one completion")
        if self.scored is None:
            self.scored = [[True] * len(c) for c in self.completions]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + sum(len(c) for c in self.completions)


@dataclass
class PackedBatch:
    """Groups laid out in one row; see the module docstring."""

    input_ids: torch.Tensor      # [1, T]
    position_ids: torch.Tensor   # [1, T]
    layout: GroupLayout        # how attention sees the groups
    predict_at: torch.Tensor     # [n] packed positions whose hidden state predicts a scored token
    targets: torch.Tensor        # [n] the scored tokens
    sequence: torch.Tensor       # [n] completion index (group-major) of each scored token
    num_sequences: int
    lengths: torch.Tensor        # [num_sequences] scored tokens per completion

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[1])


@dataclass
class GroupLayout:
    """How attention sees a packed row: every (prompt + completion) sequence as a row of a grid.

    ``index[r, i]`` is the packed position of token i of sequence r (right-padded with 0), so
    ``x[index]`` lays the row out as [num_sequences, S], each row a plain causal sequence: the
    prompt's keys and values, computed once, are read by each of its completions. ``owner[t]``
    is the grid cell (flattened) whose output packed position t keeps: the first sequence of
    its group for a prompt token, its own sequence for a completion token.
    """

    index: torch.Tensor   # [num_sequences, S]
    owner: torch.Tensor   # [T]

    def to(self, device) -> GroupLayout:
        return GroupLayout(self.index.to(device), self.owner.to(device))


def group_layout(rows: list[list[int]], num_tokens: int) -> GroupLayout:
    """``rows``: the packed positions of each sequence (prompt then completion), in order."""
    width = max(len(r) for r in rows)
    index = torch.zeros(len(rows), width, dtype=torch.long)
    owner = torch.full((num_tokens,), -1, dtype=torch.long)
    for r, positions in enumerate(rows):
        index[r, :len(positions)] = torch.tensor(positions, dtype=torch.long)
        cells = torch.arange(len(positions)) + r * width
        where = torch.tensor(positions, dtype=torch.long)
        unset = owner[where] < 0
        owner[where[unset]] = cells[unset]
    return GroupLayout(index, owner)


def pack_groups(groups: list[Group]) -> PackedBatch:
    ids, pos, rows = [], [], []
    predict_at, targets, sequence, lengths = [], [], [], []
    seq_index = 0
    for g in groups:
        start = len(ids)
        p = len(g.prompt)
        ids += g.prompt
        pos += list(range(p))
        for completion, scored in zip(g.completions, g.scored):
            base = len(ids)
            ids += completion
            pos += list(range(p, p + len(completion)))
            rows.append(list(range(start, start + p)) + list(range(base, base + len(completion))))
            count = 0
            for j, (token, keep) in enumerate(zip(completion, scored)):
                if keep:
                    predict_at.append(start + p - 1 if j == 0 else base + j - 1)
                    targets.append(token)
                    sequence.append(seq_index)
                    count += 1
            lengths.append(count)
            seq_index += 1
    return PackedBatch(
        input_ids=torch.tensor([ids], dtype=torch.long),
        position_ids=torch.tensor([pos], dtype=torch.long),
        layout=group_layout(rows, len(ids)),
        predict_at=torch.tensor(predict_at, dtype=torch.long),
        targets=torch.tensor(targets, dtype=torch.long),
        sequence=torch.tensor(sequence, dtype=torch.long),
        num_sequences=seq_index,
        lengths=torch.tensor(lengths, dtype=torch.long),
    )


# -------------------------------------------------------------------------------- attention


def _packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                      rlhfkit_layout: GroupLayout | None = None, **kwargs):
    """Attention of one packed row (query [1, H, T, D], key/value [1, H_kv, T, D]) -> [1, T, H, D].

    The row is gathered into a [num_sequences, H, S, D] grid of plain causal sequences (prompt
    then one completion; a completion never sees its siblings), attended with SDPA's causal
    kernel, and each packed position takes its output from its owner cell.
    """
    if rlhfkit_layout is None:
        raise RuntimeError(f"the {ATTENTION_NAME!r} attention needs the packed layout (use packed_forward)")
    layout = rlhfkit_layout
    repeats = getattr(module, "num_key_value_groups", 1)

    def grid(x):  # [1, h, T, D] -> [R, h, S, D]
        return x[0][:, layout.index].transpose(0, 1)

    q, k, v = grid(query), grid(key), grid(value)
    if repeats > 1:
        k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
    if q.device.type == "cpu":
        # CPU's flash kernel runs ~2x slower in bfloat16 than in float32 (forward + backward, on the
        # PPO update's shapes), and attention is a small share of the FLOPs: attend in float32, also
        # under --bf16's autocast (which would cast the inputs to bfloat16)
        with torch.autocast("cpu", enabled=False):
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), dropout_p=dropout,
                                                 scale=scaling, is_causal=True).to(value.dtype)
    else:
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=True)
    rows, heads, width, dim = out.shape
    return out.transpose(1, 2).reshape(rows * width, heads, dim)[layout.owner].unsqueeze(0), None


def _no_mask(*args, **kwargs):
    return None


_registered = False


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, _packed_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, _no_mask)
    _registered = True


def _config(model):
    return _inner(model).config


def supports_packing(model) -> bool:
    """Whether :func:`packed_forward` can run this model (Llama-family attention, no sliding window)."""
    config = _config(model)
    if getattr(config, "model_type", None) not in PACKED_MODEL_TYPES:
        return False
    if getattr(config, "use_sliding_window", False) or getattr(config, "sliding_window", None):
        return False
    return getattr(config, "final_logit_softcapping", None) is None


def _attention(model, name: str):
    return attention_implementation(_config(model), name)


@contextlib.contextmanager
def packed_attention(*models):
    """Select the packed attention for the forwards of the block, in each of ``models`` (a causal
    LM, a peft model or a bare decoder trunk); each forward must pass ``rlhfkit_layout``."""
    _register()
    with contextlib.ExitStack() as stack:
        for model in models:
            stack.enter_context(_attention(model, ATTENTION_NAME))
        yield


# -------------------------------------------------------------------------------- forwards


class _HeadLogps(torch.autograd.Function):
    """log softmax(h·Wᵀ + b)[target] for rows h [n, d]: the LM head and the log-probs in one step.

    Forward: one [n, V] buffer receives the logits and is turned in place into the softmax
    probabilities p (max-shifted exp, divided by its sum); log p[target] = z[target] − max −
    log Σ exp(z − max). Backward: dz = (onehot(target) − p)·g in place in that same buffer, then
    dh = dz·W and dW = dzᵀ·h. No second [n, V] tensor, no log-softmax, no recomputation.
    The saved buffer is consumed by the backward: it runs once (no ``retain_graph``).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets):
        logits = torch.mm(hidden, weight.t())
        if bias is not None:
            logits += bias
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        top = logits.amax(dim=-1, keepdim=True)
        picked = logits.gather(-1, targets[:, None])
        probs = logits.sub_(top).exp_()
        total = probs.sum(dim=-1, keepdim=True)
        probs.div_(total)
        ctx.save_for_backward(hidden, weight, targets, probs)
        ctx.has_bias = bias is not None
        ctx.used = False
        return (picked - top - total.log()).squeeze(-1)

    @staticmethod
    def backward(ctx, grad):
        if ctx.used:
            raise RuntimeError("the packed LM head's backward can run only once (no retain_graph)")
        ctx.used = True
        hidden, weight, targets, probs = ctx.saved_tensors
        dz = probs.mul_(-grad[:, None])
        dz.scatter_add_(-1, targets[:, None], grad[:, None].to(dz.dtype))
        dz = dz.to(weight.dtype)
        grad_hidden = torch.mm(dz, weight) if ctx.needs_input_grad[0] else None
        grad_weight = torch.mm(dz.t(), hidden) if ctx.needs_input_grad[1] else None
        grad_bias = dz.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_hidden, grad_weight, grad_bias, None


def _inner(model):
    return getattr(model, "module", model)  # DDP / accelerate wrappers


def _fused_head_logps(head: torch.nn.Linear, hidden: torch.Tensor, targets: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """:class:`_HeadLogps` at temperature τ: the head's input and bias divided by τ, which divides
    the logits: (h/τ)·Wᵀ + b/τ = (h·Wᵀ + b)/τ."""
    bias = head.bias
    if temperature != 1.0:
        hidden, bias = hidden / temperature, None if bias is None else bias / temperature
    return _HeadLogps.apply(hidden, head.weight, bias, targets)


def head_logps(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
               temperature: float = 1.0) -> torch.Tensor:
    """log softmax(head(h) / τ)[target] for hidden states ``[n, d]`` and targets ``[n]``: fused
    (:class:`_HeadLogps`, no logits kept) for a plain Linear head, else
    :func:`rlhfkit.losses.token_logps` of the head's logits."""
    if type(head) is torch.nn.Linear:
        return _fused_head_logps(head, hidden, targets, temperature)
    return token_logps(head(hidden), targets, temperature)


@contextlib.contextmanager
def _head_returns_logps(model, targets: torch.Tensor, temperature: float = 1.0):
    """Make the LM head return log p(target) ([1, n, 1]) instead of logits, for one forward.

    The model's own forward still runs (so DDP, PEFT and hooks see a normal call); only the
    head's output changes (:func:`_fused_head_logps`). Yields False (nothing patched) for a head
    that is not a plain Linear.
    """
    head = _inner(model).get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        yield False
        return

    def forward(hidden):
        flat = hidden.reshape(-1, hidden.shape[-1])
        return _fused_head_logps(head, flat, targets, temperature).view(*hidden.shape[:-1], 1)

    head.forward = forward
    try:
        yield True
    finally:
        del head.forward


@dataclass
class Scored:
    """What a forward over groups returns (completions in group-major order)."""

    logps: torch.Tensor      # [num_sequences] summed log π(completion | prompt) over scored tokens
    lengths: torch.Tensor    # [num_sequences] scored tokens per completion
    tokens: int              # tokens the forward processed (packed: prompts once, no padding)
    # [sum(lengths)] log π of each scored token, sequence after sequence (split by ``lengths``)
    token_logps: torch.Tensor | None = None

    def per_token(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logps [num_sequences, T], mask [num_sequences, T])``: each sequence's token log-probs
        right-padded to the longest, the mask True on real tokens (gradients flow)."""
        rows = self.token_logps.split(self.lengths.tolist())
        width = int(self.lengths.max()) if len(self.lengths) else 0
        mask = torch.arange(width, device=self.lengths.device) < self.lengths[:, None]
        return torch.nn.utils.rnn.pad_sequence(list(rows), batch_first=True), mask


def packed_forward(model, groups: list[Group], temperature: float = 1.0) -> Scored:
    """The fast path: one packed row, prompts once, the LM head only where a scored token is predicted."""
    batch = pack_groups(groups)
    device = next(model.parameters()).device
    targets = batch.targets.to(device)
    with packed_attention(model), _head_returns_logps(model, targets, temperature) as fused:
        out = model(input_ids=batch.input_ids.to(device), position_ids=batch.position_ids.to(device),
                    logits_to_keep=batch.predict_at.to(device), use_cache=False,
                    rlhfkit_layout=batch.layout.to(device))
    logps = out.logits[0, :, 0] if fused else token_logps(out.logits[0], targets, temperature)
    sums = logps.new_zeros(batch.num_sequences).index_add(0, batch.sequence.to(device), logps)
    return Scored(sums, batch.lengths.to(device), batch.num_tokens, logps)


def padded_forward(model, groups: list[Group], pad_id: int = 0, temperature: float = 1.0) -> Scored:
    """The reference path: one right-padded row per (prompt + completion); same results as packed."""
    rows = [[Encoded(g.prompt + completion, [False] * len(g.prompt) + list(scored))]
            for g in groups for completion, scored in zip(g.completions, g.scored)]
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in collate(rows, pad_id).items()}
    width = batch["input_ids"].shape[1]
    # Hidden states of the last position predict nothing: keep all but it.
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], logits_to_keep=slice(0, width - 1), use_cache=False)
    target = batch["labels"][:, 1:]
    valid = target != -100
    flat = token_logps(out.logits[valid], target[valid], temperature)
    sums = flat.new_zeros(len(rows)).index_add(0, valid.nonzero()[:, 0], flat)
    return Scored(sums, valid.sum(-1), int(batch["attention_mask"].sum()), flat)


def completion_logps(model, groups: list[Group], packed: bool | None = None, pad_id: int = 0,
                     temperature: float = 1.0, batch_size: int = 0) -> Scored:
    """Summed log π(completion | prompt) for every completion of every group (group-major order).

    The one sequence log-prob API of rlhfkit (DPO, rejection sampling, ``eval-rm --ref``, KL to a
    reference, the demo). ``temperature`` τ scores under softmax(logits / τ), the distribution a
    sampler at τ draws from. ``batch_size`` groups per forward (0: all in one). ``packed=None``
    picks the packed path when the model supports it. Gradients flow unless the caller disables them.
    """
    if packed is None:
        packed = supports_packing(model)
    step = batch_size or max(len(groups), 1)
    parts = [packed_forward(model, groups[i:i + step], temperature) if packed
             else padded_forward(model, groups[i:i + step], pad_id, temperature)
             for i in range(0, len(groups), step)]
    if len(parts) == 1:
        return parts[0]
    return Scored(torch.cat([p.logps for p in parts]), torch.cat([p.lengths for p in parts]),
                  sum(p.tokens for p in parts), torch.cat([p.token_logps for p in parts]))
