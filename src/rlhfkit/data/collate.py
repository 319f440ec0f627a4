"""Batches of token ids: the one padding helper and the one collate of encoded examples.

Every padded batch in rlhfkit is built here: right-padded training and scoring rows (labels
-100 outside the trained tokens), left-padded prompts for generation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from rlhfkit.data.chat import Encoded

Side = Literal["left", "right"]


def pad_rows(rows: Sequence[Sequence[int]], value: int, side: Side = "right") -> torch.Tensor:
    """``rows`` as one ``[B, W]`` long tensor, W the longest row; shorter rows are filled with
    ``value`` on ``side`` (right: after the tokens; left: before them, as ``generate`` wants)."""
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            where = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
            out[i, where] = torch.as_tensor(row, dtype=torch.long)
    return out


def pad_batch(rows: Sequence[Sequence[int]], pad_id: int, side: Side = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids [B, W], attention_mask [B, W])``: the rows padded with ``pad_id`` on ``side``,
    the mask 1 on the real tokens and 0 on the padding."""
    return pad_rows(rows, pad_id, side), pad_rows([[1] * len(r) for r in rows], 0, side)


def collate(rows: list[list[Encoded]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; labels are -100 outside trained tokens. Each row may hold several examples
    (packing): position ids restart at 0 for each."""
    ids, mask = pad_batch([[t for e in row for t in e.input_ids] for row in rows], pad_id)
    labels = pad_rows([[t if k else -100 for e in row for t, k in zip(e.input_ids, e.trained)] for row in rows], -100)
    positions = pad_rows([[p for e in row for p in range(len(e.input_ids))] for row in rows], 0)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "position_ids": positions}
