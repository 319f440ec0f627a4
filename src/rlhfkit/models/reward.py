"""Reward models: a scalar head on any backbone, saved so that transformers loads it directly.

The model is ``AutoModelForSequenceClassification`` with ``num_labels=1``: a causal LM reads
the last non-padding token (the tokenizer's pad token is kept distinct from EOS for that), an
encoder its pooled output. What the reward model reads is built by :func:`reward_texts`: the
conversation rendered with the reward model's *own* chat template, or a (prompt, completion)
sentence pair for an encoder without one. An optional offset stored in the config
(``rlhfkit_reward_offset``) normalises scores so that the mean training reward is 0.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rlhfkit.data.chat import as_messages, completion_messages, has_template, prompt_text
from rlhfkit.data.collate import pad_rows
from rlhfkit.models.loading import load_tokenizer, resolve_model

OFFSET_KEY = "rlhfkit_reward_offset"


def load_reward_backbone(name: str, tokenizer, dtype: str = "float32", device=None, bits: int = 0):
    """A fresh scalar head on ``name`` (or a trained reward model, head included), on ``device``
    (default: :func:`rlhfkit.models.loading.default_device`) in ``dtype`` or quantized to ``bits``."""
    from transformers import AutoModelForSequenceClassification

    from rlhfkit.errors import InputError
    from rlhfkit.models.loading import load_kwargs, place, quiet_transformers

    quiet_transformers()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            resolve_model(name), num_labels=1, **load_kwargs(dtype, device, bits))
    except (OSError, ValueError) as e:  # no such model, or one with no sequence-classification head
        raise InputError(f"--model {name}: cannot load a reward-model backbone from it "
                         f"({(str(e).strip().splitlines() or [type(e).__name__])[0]})") from None
    model.config.pad_token_id = tokenizer.pad_token_id
    return place(model, device, bits)


def reward_inputs(tokenizer, prompts: list, completions: list, max_length: int = 512) -> dict:
    """Tokenised reward-model inputs, truncated from the left of long prompts and padded on the
    tokenizer's own padding side by :func:`rlhfkit.data.collate.pad_rows`."""
    if has_template(tokenizer):
        texts = [tokenizer.apply_chat_template(as_messages(p) + completion_messages(c), tokenize=False)
                 for p, c in zip(prompts, completions)]
        side = tokenizer.truncation_side
        tokenizer.truncation_side = "left"  # keep the response when the conversation is long
        try:
            enc = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=max_length)
        finally:
            tokenizer.truncation_side = side
    else:
        firsts = [prompt_text(p) for p in prompts]
        seconds = [c if isinstance(c, str) else "\n".join(m["content"] for m in c) for c in completions]
        enc = tokenizer(firsts, seconds, truncation="longest_first", max_length=max_length)
    fill = {"input_ids": tokenizer.pad_token_id, "token_type_ids": getattr(tokenizer, "pad_token_type_id", 0)}
    return {key: pad_rows(rows, fill.get(key, 0), tokenizer.padding_side) for key, rows in enc.items()}


def forward_rewards(model, batch: dict) -> torch.Tensor:
    """Scalar rewards [B] (no offset applied)."""
    device = next(model.parameters()).device
    out = model(**{k: v.to(device) for k, v in batch.items()})
    return out.logits.squeeze(-1).float()


class RewardModel:
    """A trained reward model: ``score(prompts, completions) -> list[float]``."""

    def __init__(self, model, tokenizer, max_length: int = 512):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.offset = float(getattr(model.config, OFFSET_KEY, 0.0) or 0.0)

    @torch.no_grad()
    def score(self, prompts: list, completions: list, batch_size: int = 16) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError("prompts and completions must have the same length")
        scores: list[float] = []
        for i in range(0, len(prompts), batch_size):
            batch = reward_inputs(self.tokenizer, prompts[i:i + batch_size], completions[i:i + batch_size],
                                  self.max_length)
            scores += (forward_rewards(self.model, batch) - self.offset).tolist()
        return scores

    __call__ = score


def load_reward_model(path: str, dtype: str = "float32", max_length: int = 512, device=None) -> RewardModel:
    tokenizer = load_tokenizer(path)
    model = load_reward_backbone(path, tokenizer, dtype, device)
    return RewardModel(model, tokenizer, max_length)


def is_reward_model_dir(path: str) -> bool:
    import json

    cfg = Path(path) / "config.json"
    if not cfg.exists():
        return False
    archs = json.loads(cfg.read_text()).get("architectures") or []
    return any(a.endswith("ForSequenceClassification") for a in archs)
