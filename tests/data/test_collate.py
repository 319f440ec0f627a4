"""The one padding helper: right-padded training rows, left-padded prompts."""

from __future__ import annotations

from rlhfkit.data.collate import pad_batch, pad_rows


def test_pad_rows_right_and_left():
    rows = [[5, 6, 7], [8], []]
    assert pad_rows(rows, 0).tolist() == [[5, 6, 7], [8, 0, 0], [0, 0, 0]]
    assert pad_rows(rows, -100, side="left").tolist() == [[5, 6, 7], [-100, -100, 8], [-100, -100, -100]]
    assert pad_rows([], 0).shape == (0, 0)


def test_pad_batch_masks_the_padding():
    ids, mask = pad_batch([[3, 4], [9, 8, 7]], pad_id=1, side="left")
    assert ids.tolist() == [[1, 3, 4], [9, 8, 7]]
    assert mask.tolist() == [[0, 1, 1], [1, 1, 1]]
    ids, mask = pad_batch([[3, 4], [9, 8, 7]], pad_id=1)
    assert ids.tolist() == [[3, 4, 1], [9, 8, 7]] and mask.tolist() == [[1, 1, 0], [1, 1, 1]]
