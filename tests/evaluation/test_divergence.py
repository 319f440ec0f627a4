"""kl_to_reference (the one KL of sampled completions) and best-of-N's analytic KL, by hand."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from rlhfkit.evaluation.divergence import best_of_n_kl, kl_to_reference
from rlhfkit.models.packed import Group


class Bigram(torch.nn.Module):
    """A 2-token 'language model' whose next-token logits are the same row at every position."""

    def __init__(self, row: list[float]):
        super().__init__()
        self.row = torch.nn.Parameter(torch.tensor(row))
        self.config = SimpleNamespace(model_type="bigram")  # not a Llama: the padded path

    def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep=None, use_cache=False):
        logits = self.row.expand(*input_ids.shape, -1)
        return SimpleNamespace(logits=logits[:, logits_to_keep] if logits_to_keep is not None else logits)


GROUPS = [Group([1], [[0, 1], [0]])]  # one prompt, two sampled completions


def test_kl_to_reference_hand_worked():
    """π uniform: log π([0, 1]) = 2 log 0.5 = −1.386294, log π([0]) = −0.693147.
    π_ref = softmax([ln 3, 0]) = [0.75, 0.25]: log π_ref([0, 1]) = log 0.75 + log 0.25 = −1.673976,
    log π_ref([0]) = −0.287682.
    k1 = mean(−1.386294 + 1.673976, −0.693147 + 0.287682) = mean(0.287682, −0.405465) = −0.058892.
    k3 = (r − 1) − log r, log r = log π_ref − log π: r = 0.75 → 0.037682; r = 1.5 → 0.094535;
    mean 0.066109.
    At τ = 0.5 π stays uniform and π_ref = softmax([2 ln 3, 0]) = [0.9, 0.1]:
    k1 = mean(−1.386294 + 2.407946, −0.693147 + 0.105361) = mean(1.021652, −0.587786) = 0.216933."""
    policy, reference = Bigram([0.0, 0.0]), Bigram([math.log(3.0), 0.0])
    policy.train(), reference.eval()
    assert kl_to_reference(policy, reference, GROUPS) == pytest.approx(-0.058892, abs=1e-6)
    assert kl_to_reference(policy, reference, GROUPS, estimator="k3") == pytest.approx(0.066109, abs=1e-6)
    assert kl_to_reference(policy, reference, GROUPS, temperature=0.5) == pytest.approx(0.216933, abs=1e-6)
    assert kl_to_reference(policy, policy, GROUPS) == 0.0
    assert policy.training and not reference.training  # each model's mode is restored
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_to_reference(policy, reference, GROUPS, estimator="k9")


def test_best_of_n_kl():
    """log N − (N − 1)/N: N = 1 → 0; N = 4 → log 4 − 0.75 = 0.636294."""
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(4) == pytest.approx(0.636294, abs=1e-6)
