"""Per-token log-probabilities of given sequences, with the most likely alternatives at each position.

What an evaluation API reports (OpenAI's ``logprobs``): for each scored token, log π(token | the
tokens before it) and the ``top`` most likely tokens there with their log-probs. One teacher-forced
forward per batch of right-padded rows (:func:`rlhfkit.data.collate.collate`); every log-prob, the
chosen token's and each alternative's, comes from :func:`rlhfkit.losses.token_logps`, so the chosen
token's value equals the top alternative's exactly when it is the most likely one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhfkit.data.chat import Encoded
from rlhfkit.data.collate import collate
from rlhfkit.losses import token_logps


@dataclass
class TokenScores:
    """The scored tokens of one sequence: ``sequence[start:]``."""

    token_ids: list[int]                   # the scored tokens
    logps: list[float]                     # log π(token_i | sequence before it)
    top: list[list[tuple[int, float]]]     # per token: (id, log-prob) of the `top` most likely, best first


def score_tokens(model, sequences: list[list[int]], starts: list[int], top: int = 0, pad_id: int = 0,
                 batch_size: int = 8) -> list[TokenScores]:
    """Log-probs of ``sequences[i][starts[i]:]`` (``starts[i] >= 1``: no logit predicts token 0)
    and the ``top`` most likely tokens at each of those positions, under ``model`` as it is
    (its dtype; no gradients). One forward per ``batch_size`` sequences."""
    if any(s < 1 for s in starts):
        raise ValueError("score_tokens: starts must be >= 1 (the first token of a sequence has no log-prob)")
    out: list[TokenScores] = []
    for i in range(0, len(sequences), max(1, batch_size)):
        out += _score_batch(model, sequences[i:i + batch_size], starts[i:i + batch_size], top, pad_id)
    return out


@torch.no_grad()
def _score_batch(model, sequences: list[list[int]], starts: list[int], top: int, pad_id: int) -> list[TokenScores]:
    counts = [max(0, len(seq) - s) for seq, s in zip(sequences, starts)]
    if not any(counts):
        return [TokenScores([], [], []) for _ in sequences]
    rows = [[Encoded(list(seq), [j >= s for j in range(len(seq))])] for seq, s in zip(sequences, starts)]
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in collate(rows, pad_id).items()}
    width = batch["input_ids"].shape[1]
    # The last position predicts nothing: its logits are not computed.
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"], logits_to_keep=slice(0, width - 1), use_cache=False).logits
    target = batch["labels"][:, 1:]
    valid = target != -100
    scored = logits[valid]                                  # [n, V]: the positions that predict a scored token
    chosen = token_logps(scored, target[valid]).tolist()
    top = min(top, scored.shape[-1])
    alt_ids = scored.topk(top, dim=-1).indices if top else scored.new_zeros(len(scored), 0, dtype=torch.long)
    alt_logps = [token_logps(scored, alt_ids[:, j]) for j in range(top)]
    alts = torch.stack(alt_logps, dim=-1).tolist() if top else [[] for _ in chosen]
    ids = target[valid].tolist()
    alt_ids = alt_ids.tolist()
    out, at = [], 0
    for n in counts:
        out.append(TokenScores(ids[at:at + n], chosen[at:at + n],
                               [list(zip(alt_ids[k], alts[k])) for k in range(at, at + n)]))
        at += n
    return out
