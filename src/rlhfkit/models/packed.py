"""Log-probabilities of several completions that share a prompt, in one padding-free forward.

DPO scores a chosen and a rejected answer to the same prompt; rejection sampling and KL
estimates score N samples of one prompt. A *group* is one prompt and its K completions. The
fast path lays every group of a batch out in one row, with no padding::

    [ prompt_1 | completion_1,1 | completion_1,2 | prompt_2 | completion_2,1 | ... ]

- the prompt is encoded once per group, not once per completion;
- position ids restart after the prompt for each completion, so completion k sees exactly the
  positions it would see alone after the prompt (rotary embeddings depend only on them);
- attention runs group by group with a mask that lets a completion attend to its prompt and
  to its own earlier tokens, never to a sibling completion (the attention function is
  registered with transformers' ``AttentionInterface`` and selected only for this forward);
- the LM head is applied only at the positions that predict a scored token
  (``logits_to_keep`` with an index tensor), so no logits exist for prompts or padding, and the
  log-softmax is never materialised: log p = logit[label] − logsumexp(logits).

Every projection and MLP matmul then runs on exactly the real tokens. The fast path covers the
Llama family (Llama, Mistral, Qwen2/3, SmolLM); any other model falls back to a right-padded
batch of prompt+completion rows (:func:`padded_forward`), which gives the same numbers.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

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
            raise ValueError("a group needs at least one prompt token (the first completion token is predicted from it)")
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
    segments: list               # (start, end, attention mask [S, S] bool) per group
    predict_at: torch.Tensor     # [n] packed positions whose hidden state predicts a scored token
    targets: torch.Tensor        # [n] the scored tokens
    sequence: torch.Tensor       # [n] completion index (group-major) of each scored token
    num_sequences: int
    lengths: torch.Tensor        # [num_sequences] scored tokens per completion

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[1])


def group_mask(prompt_len: int, completion_lens: list[int]) -> torch.Tensor:
    """[S, S] boolean attention mask of one group: causal, and no completion sees a sibling."""
    block = torch.cat([torch.zeros(prompt_len, dtype=torch.long)] +
                      [torch.full((n,), k + 1, dtype=torch.long) for k, n in enumerate(completion_lens)])
    size = block.numel()
    causal = torch.ones(size, size, dtype=torch.bool).tril()
    same_or_prompt = (block[None, :] == 0) | (block[None, :] == block[:, None])
    return causal & same_or_prompt


def pack_groups(groups: list[Group]) -> PackedBatch:
    ids, pos, segments = [], [], []
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
            count = 0
            for j, (token, keep) in enumerate(zip(completion, scored)):
                if keep:
                    predict_at.append(start + p - 1 if j == 0 else base + j - 1)
                    targets.append(token)
                    sequence.append(seq_index)
                    count += 1
            lengths.append(count)
            seq_index += 1
        segments.append((start, len(ids), group_mask(p, [len(c) for c in g.completions])))
    return PackedBatch(
        input_ids=torch.tensor([ids], dtype=torch.long),
        position_ids=torch.tensor([pos], dtype=torch.long),
        segments=segments,
        predict_at=torch.tensor(predict_at, dtype=torch.long),
        targets=torch.tensor(targets, dtype=torch.long),
        sequence=torch.tensor(sequence, dtype=torch.long),
        num_sequences=seq_index,
        lengths=torch.tensor(lengths, dtype=torch.long),
    )


# -------------------------------------------------------------------------------- attention


def _packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                      rlhfkit_segments=None, **kwargs):
    """Attention of one packed row, group by group (query [1, H, T, D], key/value [1, H_kv, T, D])."""
    if rlhfkit_segments is None:
        raise RuntimeError(f"the {ATTENTION_NAME!r} attention needs the packed segments (use packed_forward)")
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    outs = []
    for start, end, mask in rlhfkit_segments:
        outs.append(F.scaled_dot_product_attention(
            query[:, :, start:end], key[:, :, start:end], value[:, :, start:end],
            attn_mask=mask, dropout_p=dropout, scale=scaling))
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


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
    inner = getattr(model, "module", model)  # DDP / accelerate wrappers
    return inner.config


def supports_packing(model) -> bool:
    """Whether :func:`packed_forward` can run this model (Llama-family attention, no sliding window)."""
    config = _config(model)
    if getattr(config, "model_type", None) not in PACKED_MODEL_TYPES:
        return False
    if getattr(config, "use_sliding_window", False) or getattr(config, "sliding_window", None):
        return False
    return getattr(config, "final_logit_softcapping", None) is None


@contextlib.contextmanager
def _attention(model, name: str):
    config = _config(model)
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous


# -------------------------------------------------------------------------------- forwards


class _SelectedLogps(torch.autograd.Function):
    """logit[target] − logsumexp(logits), with a backward that writes one [n, V] buffer.

    Autograd's own backward of the same expression allocates three (softmax from logsumexp,
    the zero-filled scatter of gather, their sum): d/dlogits = onehot(target) − softmax.
    """

    @staticmethod
    def forward(ctx, logits, targets):
        lse = torch.logsumexp(logits, dim=-1)
        ctx.save_for_backward(logits, targets, lse)
        return logits.gather(-1, targets[:, None]).squeeze(-1) - lse

    @staticmethod
    def backward(ctx, grad):
        logits, targets, lse = ctx.saved_tensors
        g = torch.sub(logits, lse[:, None]).exp_().mul_(-grad[:, None])
        g.scatter_add_(-1, targets[:, None], grad[:, None].to(g.dtype))
        return g, None


def selected_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] per row of ``logits`` [n, V], without a [n, V] log-softmax."""
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    if logits.requires_grad:
        return _SelectedLogps.apply(logits, targets)
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


@dataclass
class Scored:
    """What a forward over groups returns (completions in group-major order)."""

    logps: torch.Tensor      # [num_sequences] summed log π(completion | prompt) over scored tokens
    lengths: torch.Tensor    # [num_sequences] scored tokens per completion
    tokens: int              # tokens the forward processed (packed: prompts once, no padding)


def packed_forward(model, groups: list[Group]) -> Scored:
    """The fast path: one packed row, prompts once, logits only where a scored token is predicted."""
    _register()
    batch = pack_groups(groups)
    device = next(model.parameters()).device
    segments = [(s, e, m.to(device)) for s, e, m in batch.segments]
    with _attention(model, ATTENTION_NAME):
        out = model(input_ids=batch.input_ids.to(device), position_ids=batch.position_ids.to(device),
                    logits_to_keep=batch.predict_at.to(device), use_cache=False, rlhfkit_segments=segments)
    token_logps = selected_logps(out.logits[0], batch.targets.to(device))
    sums = token_logps.new_zeros(batch.num_sequences).index_add(0, batch.sequence.to(device), token_logps)
    return Scored(sums, batch.lengths.to(device), batch.num_tokens)


def padded_forward(model, groups: list[Group], pad_id: int = 0) -> Scored:
    """The reference path: one right-padded row per (prompt + completion); same results as packed."""
    rows, labels = [], []
    for g in groups:
        for completion, scored in zip(g.completions, g.scored):
            rows.append(g.prompt + completion)
            labels.append([-100] * len(g.prompt) + [t if k else -100 for t, k in zip(completion, scored)])
    width = max(len(r) for r in rows)
    device = next(model.parameters()).device
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    lab = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, l) in enumerate(zip(rows, labels)):
        ids[i, :len(r)] = torch.tensor(r)
        lab[i, :len(l)] = torch.tensor(l)
        mask[i, :len(r)] = 1
    ids, lab, mask = ids.to(device), lab.to(device), mask.to(device)
    # Hidden states of the last position predict nothing: keep all but it.
    out = model(input_ids=ids, attention_mask=mask, logits_to_keep=slice(0, width - 1), use_cache=False)
    target = lab[:, 1:]
    valid = target != -100
    logits = out.logits
    flat = selected_logps(logits[valid], target[valid])
    sums = flat.new_zeros(len(rows)).index_add(0, valid.nonzero()[:, 0], flat)
    return Scored(sums, valid.sum(-1), int(mask.sum()))


def completion_logps(model, groups: list[Group], packed: bool | None = None, pad_id: int = 0) -> Scored:
    """Summed log π(completion | prompt) for every completion of every group (group-major order).

    ``packed=None`` picks the packed path when the model supports it.
    """
    if packed is None:
        packed = supports_packing(model)
    return packed_forward(model, groups) if packed else padded_forward(model, groups, pad_id)
