"""Process reward models (PRMs): the probability that a chain of reasoning is still correct after
each of its steps (Lightman et al. 2023, "Let's Verify Step by Step"; Math-Shepherd, Wang et al. 2024).

The model is ``AutoModelForTokenClassification`` with two labels (0 wrong, 1 correct) on any
backbone, a causal LM or an encoder, read at one token per step: the last token of the
separator (``--step-separator``, default a newline) written after the step, as TRL's PRMTrainer
does. The sequence is built piece by piece: the prompt, the separator, then each step followed
by the separator, every piece tokenised on its own and the ids concatenated. So the position of
every separator is known exactly even with a tokenizer that would merge the separator with its
neighbours in the joined text (SmolLM2's merges ``\\n\\n`` into one token). A separator that
tokenises to nothing (whitespace in WordPiece: an encoder such as MiniLM drops ``\\n``) is
replaced by the tokenizer's ``[SEP]`` token.

The separator is stored in the saved model's config (``rlhfkit_step_separator``), so scoring
uses the one the model was trained with. :class:`ProcessRewardModel` scores given steps
(``score_steps``) or whole completions split at the separator and reduced to one number
(``score``, for best-of-N: :data:`AGGREGATES`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhfkit.data.chat import prompt_text, raw_text_ids
from rlhfkit.data.collate import pad_batch, pad_rows
from rlhfkit.errors import InputError
from rlhfkit.models.loading import load_tokenizer, resolve_model

SEPARATOR_KEY = "rlhfkit_step_separator"
DEFAULT_SEPARATOR = "\n"
LABELS = {0: "wrong", 1: "correct"}

# One score per completion from the probabilities of its steps. min: the weakest step (Math-Shepherd);
# prod: the probability that every step is correct (Lightman et al.); last: the final step's.
AGGREGATES: dict[str, Callable[[list[float]], float]] = {
    "min": min,
    "prod": math.prod,
    "last": lambda probs: probs[-1],
}


def load_prm_backbone(name: str, tokenizer, dtype: str = "float32", device=None, bits: int = 0):
    """A fresh two-label token head on ``name`` (or a trained PRM, head included), on ``device``
    (default: :func:`rlhfkit.models.loading.default_device`) in ``dtype`` or quantized to ``bits``."""
    from transformers import AutoModelForTokenClassification

    from rlhfkit.models.loading import load_kwargs, place, quiet_transformers

    quiet_transformers()
    try:
        model = AutoModelForTokenClassification.from_pretrained(
            resolve_model(name), num_labels=len(LABELS), id2label=LABELS,
            label2id={v: k for k, v in LABELS.items()}, **load_kwargs(dtype, device, bits))
    except (OSError, ValueError) as e:  # no such model, or one with no token-classification head
        raise InputError(f"--model {name}: cannot load a process-reward-model backbone from it "
                         f"({(str(e).strip().splitlines() or [type(e).__name__])[0]})") from None
    model.config.pad_token_id = tokenizer.pad_token_id
    return place(model, device, bits)


def separator_ids(tokenizer, separator: str) -> list[int]:
    """The token ids written after every step: ``separator`` tokenised on its own, or the
    tokenizer's ``[SEP]`` when it tokenises to nothing (whitespace to a WordPiece encoder)."""
    ids = tokenizer(separator, add_special_tokens=False)["input_ids"]
    if ids:
        return ids
    if tokenizer.sep_token_id is not None:
        return [tokenizer.sep_token_id]
    raise InputError(f"--step-separator {separator!r}: this tokenizer turns it into no token at all "
                     "and has no [SEP] token to stand for it; choose a visible separator")


def prefix_ids(tokenizer) -> list[int]:
    """What starts every sequence: an encoder's [CLS], else the BOS of raw text (rlhfkit's one BOS
    rule, :func:`rlhfkit.data.chat.raw_text_ids`: the BOS a tokenizer adds by itself)."""
    if tokenizer.cls_token_id is not None:
        return [tokenizer.cls_token_id]
    return raw_text_ids(tokenizer, "")


@dataclass(frozen=True)
class StepEncoding:
    """One chain as token ids; ``step_ends[i]`` is the position of the last separator token after
    step i (where the model's verdict on step i is read). ``truncated``: the prompt lost tokens
    from its start or steps were cut from the end to fit the length limit."""

    input_ids: list[int]
    step_ends: list[int]
    truncated: bool = False


def encode_steps(tokenizer, prompt, steps: list[str], separator: str, max_length: int | None = None) -> StepEncoding:
    """``prefix + prompt + sep + step_1 + sep + ... + step_n + sep``, each piece tokenised separately.

    Longer than ``max_length``: the prompt loses tokens from its start (keeping its last ones, the
    question), then whole steps are cut from the end; ``step_ends`` then covers the kept steps.
    """
    sep = separator_ids(tokenizer, separator)
    prefix = prefix_ids(tokenizer)
    prompt_ids = tokenizer(prompt_text(prompt), add_special_tokens=False)["input_ids"] + sep
    pieces = [tokenizer(step, add_special_tokens=False)["input_ids"] + sep for step in steps]
    truncated = False
    if max_length is not None:
        room = max_length - len(prefix) - sum(len(p) for p in pieces)
        if room < len(prompt_ids):
            truncated = True
            prompt_ids = prompt_ids[len(prompt_ids) - max(room, len(sep)):]
        while pieces and len(prefix) + len(prompt_ids) + sum(len(p) for p in pieces) > max_length:
            pieces, truncated = pieces[:-1], True
    ids, ends = prefix + prompt_ids, []
    for piece in pieces:
        ids = ids + piece
        ends.append(len(ids) - 1)
    return StepEncoding(ids, ends, truncated)


def step_batch(encodings: list[StepEncoding], pad_id: int, labels: list[list[bool | None]] | None = None) -> dict:
    """Right-padded ``input_ids``/``attention_mask`` [B, T]; with ``labels`` also ``labels`` [B, T]:
    1 (correct) / 0 (wrong) at each step's separator, -100 everywhere else and at steps labelled None."""
    ids, mask = pad_batch([e.input_ids for e in encodings], pad_id)
    batch = {"input_ids": ids, "attention_mask": mask}
    if labels is not None:
        rows = []
        for e, row in zip(encodings, labels):
            at_end = dict(zip(e.step_ends, row))
            rows.append([-100 if at_end.get(t) is None else int(at_end[t]) for t in range(len(e.input_ids))])
        batch["labels"] = pad_rows(rows, -100)
    return batch


def step_logits(model, batch: dict) -> torch.Tensor:
    """The two-label logits at every position [B, T, 2] (float32)."""
    device = next(model.parameters()).device
    out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
    return out.logits.float()


@torch.no_grad()
def step_log_probs(model, encodings: list[StepEncoding], pad_id: int, batch_size: int = 16) -> list[torch.Tensor]:
    """Per chain, the log-probabilities [steps, 2] (wrong, correct) read at its separators (on the CPU)."""
    out = []
    for i in range(0, len(encodings), batch_size):
        chunk = encodings[i:i + batch_size]
        logp = torch.log_softmax(step_logits(model, step_batch(chunk, pad_id)), dim=-1).cpu()
        out += [logp[j, e.step_ends] for j, e in enumerate(chunk)]
    return out


def split_steps(text: str, separator: str) -> list[str]:
    """The steps of a completion: its pieces between separators, stripped, the empty ones left out."""
    return [s.strip() for s in text.split(separator) if s.strip()]


class ProcessRewardModel:
    """A trained PRM: ``score_steps(prompts, steps) -> list[list[float]]`` (the probability that
    each step is correct) and ``score(prompts, completions) -> list[float]`` (completions split
    at the separator, their step probabilities reduced by ``aggregate``)."""

    def __init__(self, model, tokenizer, separator: str | None = None, max_length: int | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.separator = separator if separator is not None else \
            getattr(model.config, SEPARATOR_KEY, None) or DEFAULT_SEPARATOR
        self.max_length = max_length

    def score_steps(self, prompts: list, steps: list[list[str]], batch_size: int = 16) -> list[list[float]]:
        if len(prompts) != len(steps):
            raise ValueError(f"{len(prompts)} prompts for {len(steps)} step lists: expected one list per prompt")
        encodings = [encode_steps(self.tokenizer, prompt, chain, self.separator, self.max_length)
                     for prompt, chain in zip(prompts, steps)]
        logps = step_log_probs(self.model, encodings, self.tokenizer.pad_token_id, batch_size)
        return [lp[:, 1].exp().tolist() for lp in logps]

    def score(self, prompts: list, completions: list[str], aggregate: str = "min", batch_size: int = 16) -> list[float]:
        """One score per completion; a completion without any step scores 0."""
        reduce = AGGREGATES[aggregate]
        steps = [split_steps(c, self.separator) for c in completions]
        kept = [i for i, s in enumerate(steps) if s]
        probs = self.score_steps([prompts[i] for i in kept], [steps[i] for i in kept], batch_size)
        scores = [0.0] * len(completions)
        for i, p in zip(kept, probs):
            scores[i] = float(reduce(p))
        return scores


def load_prm(path: str, dtype: str = "float32", device=None, max_length: int | None = None) -> ProcessRewardModel:
    """Load a PRM saved by ``rlhfkit prm`` (on ``device``, default the accelerator when there is one)."""
    tokenizer = load_tokenizer(path)
    return ProcessRewardModel(load_prm_backbone(path, tokenizer, dtype, device), tokenizer, max_length=max_length)


def is_prm_dir(path: str) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.exists():
        return False
    archs = json.loads(cfg.read_text()).get("architectures") or []
    return any(a.endswith("ForTokenClassification") for a in archs)
