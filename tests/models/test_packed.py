"""The fused LM head of the packed path computes exactly losses.token_logps of the head's logits."""

from __future__ import annotations

import pytest
import torch

from rlhfkit.losses import token_logps
from rlhfkit.models.packed import _HeadLogps


@pytest.mark.parametrize("temperature,with_bias", [(1.0, False), (0.7, True)])
def test_fused_head_equals_token_logps_values_and_gradients(temperature, with_bias):
    """log softmax((h·Wᵀ + b)/τ)[target], fused (the head's input and bias divided by τ, as the
    packed forward does) and as token_logps of the head's logits: same values, same gradients
    for h, W and b."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(6, 8, generator=g, dtype=torch.float64)
    weight = torch.randn(40, 8, generator=g, dtype=torch.float64)
    bias = torch.randn(40, generator=g, dtype=torch.float64) if with_bias else None
    targets = torch.randint(0, 40, (6,), generator=g)
    upstream = torch.randn(6, generator=g, dtype=torch.float64)

    def leaves():
        return [x.clone().requires_grad_(True) if x is not None else None for x in (hidden, weight, bias)]

    h, w, b = leaves()
    fused = _HeadLogps.apply(h / temperature, w, None if b is None else b / temperature, targets)
    fused.backward(upstream)
    h2, w2, b2 = leaves()
    logits = h2 @ w2.t() + (b2 if b2 is not None else 0)
    plain = token_logps(logits, targets, temperature)
    plain.backward(upstream)
    torch.testing.assert_close(fused, plain)
    torch.testing.assert_close(h.grad, h2.grad)
    torch.testing.assert_close(w.grad, w2.grad)
    if with_bias:
        torch.testing.assert_close(b.grad, b2.grad)
