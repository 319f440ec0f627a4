"""Reward shaping: KL penalty on every response token, score on the last one, nothing outside."""

from __future__ import annotations

import math

import pytest
import torch

from rlhfkit.losses import kl_k3, masked_mean
from rlhfkit.rl.shaping import clip_scores, last_token_index, penalize_missing_eos, shape_rewards

T = torch.tensor


def close(actual, expected, atol=1e-6):
    as64 = lambda x: torch.as_tensor(x, dtype=torch.float64)  # noqa: E731
    torch.testing.assert_close(as64(actual), as64(expected), atol=atol, rtol=0)


def test_shape_rewards_hand_worked():
    """β = 0.1, k1. Row 0: 3 real tokens, log π − log π_ref = [0.5, −0.2, 0.1], score 1:
    r = [−0.05, 0.02, −0.01 + 1 = 0.99, 0]. Row 1: 2 real tokens, differences [0.3, 0.4],
    score −2: r = [−0.03, −0.04 − 2 = −2.04, 0, 0]."""
    logp = T([[-1.0, -2.0, -0.5, -9.0], [-0.7, -0.1, -4.0, -4.0]])
    ref = logp - T([[0.5, -0.2, 0.1, 3.0], [0.3, 0.4, 1.0, 1.0]])
    mask = T([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    rewards, kl = shape_rewards(T([1.0, -2.0]), logp, ref, mask, kl_coef=0.1)
    close(rewards, [[-0.05, 0.02, 0.99, 0.0], [-0.03, -2.04, 0.0, 0.0]])
    close(kl, [[0.5, -0.2, 0.1, 0.0], [0.3, 0.4, 0.0, 0.0]])


def test_shape_rewards_k3_estimator():
    """k3 on one token with π = 0.5, π_ref = 0.25: (0.5 − 1) − log 0.5 = 0.193147;
    β = 0.5, score 3 → r = 3 − 0.5·0.193147 = 2.903426."""
    rewards, kl = shape_rewards(T([3.0]), T([[math.log(0.5)]]), T([[math.log(0.25)]]), T([[True]]), 0.5, "k3")
    close(kl, [[0.193147]])
    close(rewards, [[2.903426]])
    with pytest.raises(ValueError, match="k1"):
        shape_rewards(T([3.0]), T([[0.0]]), T([[0.0]]), T([[True]]), 0.5, "k9")


def test_padding_and_post_eos_tokens_change_nothing():
    """Appending 5 masked positions with arbitrary log-probs (random, ±inf, nan) leaves the
    shaped rewards and KL on the real tokens unchanged, puts 0 in the new positions, and
    leaves the masked means (KL, rewards) unchanged; same with k3."""
    g = torch.Generator().manual_seed(0)
    B, L = 4, 6
    logp, ref = -torch.rand(B, L, generator=g) * 5, -torch.rand(B, L, generator=g) * 5
    mask = torch.arange(L).expand(B, L) < T([[6], [1], [3], [5]])
    scores = torch.randn(B, generator=g)
    junk = torch.randn(B, 5, generator=g) * 100
    junk[0, 0], junk[1, 1], junk[2, 2] = float("-inf"), float("nan"), float("inf")
    logp_long = torch.cat([torch.where(mask, logp, junk[:, :1]), junk], dim=1)
    ref_long = torch.cat([ref, junk.flip(1)], dim=1)
    mask_long = torch.cat([mask, torch.zeros(B, 5, dtype=torch.bool)], dim=1)
    for est in ("k1", "k3"):
        rewards, kl = shape_rewards(scores, logp, ref, mask, 0.2, est)
        rewards_long, kl_long = shape_rewards(scores, logp_long, ref_long, mask_long, 0.2, est)
        torch.testing.assert_close(rewards_long[:, :L], rewards)
        torch.testing.assert_close(kl_long[:, :L], kl)
        assert (rewards_long[:, L:] == 0).all() and (kl_long[:, L:] == 0).all()
        torch.testing.assert_close(masked_mean(kl_long, mask_long), masked_mean(kl, mask))
        torch.testing.assert_close(masked_mean(rewards_long, mask_long, dim=1), masked_mean(rewards, mask, dim=1))
    # the total reward of a row is its score minus β·(summed KL)
    rewards, kl = shape_rewards(scores, logp, ref, mask, 0.2, "k3")
    torch.testing.assert_close(rewards.sum(1), scores - 0.2 * torch.where(mask, kl_k3(logp, ref), 0.0).sum(1))


def test_last_token_index_and_empty_rows():
    """Last True: [1,1,0] → 1, [0,1,1] → 2, [1,0,1] → 2, [0,0,0] → −1 (shape_rewards refuses it)."""
    mask = T([[1, 1, 0], [0, 1, 1], [1, 0, 1], [0, 0, 0]], dtype=torch.bool)
    assert last_token_index(mask).tolist() == [1, 2, 2, -1]
    with pytest.raises(ValueError, match=r"\[3\]"):
        shape_rewards(torch.zeros(4), torch.zeros(4, 3), torch.zeros(4, 3), mask, 0.1)


def test_penalize_missing_eos_and_clip_scores():
    """Scores [1, 2, 3], has_eos [T, F, T], penalty 1.5 → [1, 0.5, 3].
    clip 2 → [−2, 0.5, 2] from [−5, 0.5, 7]; None leaves them unchanged."""
    close(penalize_missing_eos(T([1.0, 2.0, 3.0]), T([True, False, True]), 1.5), [1.0, 0.5, 3.0])
    close(clip_scores(T([-5.0, 0.5, 7.0]), 2.0), [-2.0, 0.5, 2.0])
    close(clip_scores(T([-5.0, 0.5, 7.0]), None), [-5.0, 0.5, 7.0])
