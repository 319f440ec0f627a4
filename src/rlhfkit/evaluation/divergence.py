"""Sequence log-probabilities and the KL between two policies, estimated from samples.

KL(π ‖ π_ref) = E_{y∼π}[log π(y|x) − log π_ref(y|x)]: the mean log-ratio over responses
sampled from π (Schulman's k1 at the sequence level: unbiased; k3 is reported beside it).
"""

from __future__ import annotations

import math

import torch

from rlhfkit.losses import token_logps


@torch.no_grad()
def sequence_logprobs(model, prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int,
                      batch_size: int = 8, temperature: float = 1.0) -> list[float]:
    """Σ_t log π(y_t | x, y_<t) for each (prompt, response) pair of token-id lists, under the
    distribution softmax(logits / ``temperature``) the samples were drawn from."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[float] = []
    for start in range(0, len(prompt_ids), batch_size):
        rows = [p + r for p, r in zip(prompt_ids[start:start + batch_size], response_ids[start:start + batch_size])]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (row, p) in enumerate(zip(rows, prompt_ids[start:start + batch_size])):
            ids[i, :len(row)] = torch.tensor(row)
            mask[i, :len(row)] = 1
            labels[i, len(p):len(row)] = torch.tensor(row[len(p):], dtype=torch.long)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        logps, _ = token_logps(logits.float() / temperature, labels.to(device))
        out += logps.sum(-1).tolist()
    model.train(was_training)
    return out


def kl_from_logratios(logratios: list[float]) -> dict[str, float]:
    """k1 (mean log-ratio, unbiased) and k3 (never negative) from per-sample log π − log π_ref."""
    if not logratios:
        return {"kl_k1": float("nan"), "kl_k3": float("nan")}
    k1 = sum(logratios) / len(logratios)
    k3 = sum(math.expm1(-lr) + lr for lr in logratios) / len(logratios)
    return {"kl_k1": k1, "kl_k3": k3}


def best_of_n_kl(n: int) -> float:
    """The analytic KL of best-of-N sampling to the base policy: log N − (N − 1)/N (Stiennon et al.)."""
    return math.log(n) - (n - 1) / n
