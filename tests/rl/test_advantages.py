"""GAE, RLOO and GRPO advantages against hand-worked numbers and plain Python loops."""

from __future__ import annotations

import math
import random

import pytest
import torch

from rlhfkit.losses import masked_mean
from rlhfkit.rl.advantages import gae, grpo_advantages, rloo_advantages, whiten

T = torch.tensor


def close(actual, expected, atol=1e-6):
    as64 = lambda x: torch.as_tensor(x, dtype=torch.float64)  # noqa: E731
    torch.testing.assert_close(as64(actual), as64(expected), atol=atol, rtol=0)


def gae_python(rewards: list[float], values: list[float], gamma: float, lam: float) -> tuple[list[float], list[float]]:
    """Textbook GAE on one trajectory of real tokens, V after the end = 0."""
    advantages = [0.0] * len(rewards)
    last = 0.0
    for t in reversed(range(len(rewards))):
        next_value = values[t + 1] if t + 1 < len(rewards) else 0.0
        delta = rewards[t] + gamma * next_value - values[t]
        last = delta + gamma * lam * last
        advantages[t] = last
    return advantages, [a + v for a, v in zip(advantages, values)]


def test_gae_hand_worked():
    """r = [0, 0, 1], V = [0.5, 0.5, 0.5].
    γ = λ = 1: A_t = Σ r − V_t = 0.5 at every t; returns 1.
    γ = 0.9, λ = 0.95 (γλ = 0.855): δ_2 = 1 − 0.5 = 0.5, δ_1 = δ_0 = 0.9·0.5 − 0.5 = −0.05;
    A_2 = 0.5, A_1 = −0.05 + 0.855·0.5 = 0.3775, A_0 = −0.05 + 0.855·0.3775 = 0.2727625;
    returns A + V = [0.7727625, 0.8775, 1.0]. A padded 4th position gets A = R = 0."""
    r = T([[0.0, 0.0, 1.0, 7.0]])
    v = T([[0.5, 0.5, 0.5, -3.0]])
    m = T([[True, True, True, False]])
    adv, ret = gae(r, v, m, gamma=1.0, lam=1.0)
    close(adv, [[0.5, 0.5, 0.5, 0.0]])
    close(ret, [[1.0, 1.0, 1.0, 0.0]])
    adv, ret = gae(r, v, m, gamma=0.9, lam=0.95)
    close(adv, [[0.2727625, 0.3775, 0.5, 0.0]])
    close(ret, [[0.7727625, 0.8775, 1.0, 0.0]])


def test_gae_matches_python_loop_on_ragged_right_padding():
    """Random rewards/values, 6 rows of random lengths 1..10 right-padded to 10, garbage
    (inf, nan, huge) in the padding: equal to the per-row Python loop on the real tokens,
    0 in the padding."""
    rng = random.Random(0)
    B, L, gamma, lam = 6, 10, 0.99, 0.95
    rewards = torch.randn(B, L, generator=torch.Generator().manual_seed(0))
    values = torch.randn(B, L, generator=torch.Generator().manual_seed(1))
    lengths = [rng.randint(1, L) for _ in range(B)]
    lengths[0] = L
    mask = torch.arange(L).expand(B, L) < T(lengths).unsqueeze(1)
    garbage = torch.tensor([float("inf"), float("nan"), 1e30]).repeat(L)[:L]
    rewards = torch.where(mask, rewards, garbage)
    values = torch.where(mask, values, garbage.flip(0))
    adv, ret = gae(rewards, values, mask, gamma, lam)
    for b, n in enumerate(lengths):
        exp_adv, exp_ret = gae_python(rewards[b, :n].tolist(), values[b, :n].tolist(), gamma, lam)
        close(adv[b, :n], exp_adv, atol=1e-5)
        close(ret[b, :n], exp_ret, atol=1e-5)
        assert (adv[b, n:] == 0).all() and (ret[b, n:] == 0).all()


def test_gae_equals_trl_recursion_with_zeroed_padding():
    """With right padding, TRL/OpenAI's recursion over all T positions on rewards and values
    zeroed at the padding gives the same advantages on the real tokens."""
    g = torch.Generator().manual_seed(2)
    rewards, values = torch.randn(4, 7, generator=g), torch.randn(4, 7, generator=g)
    mask = torch.arange(7).expand(4, 7) < T([[7], [3], [1], [5]])
    adv, _ = gae(rewards, values, mask, 0.95, 0.9)
    r0, v0 = rewards * mask, values * mask
    last, rows = 0.0, []
    for t in reversed(range(7)):
        next_v = v0[:, t + 1] if t < 6 else 0.0
        last = r0[:, t] + 0.95 * next_v - v0[:, t] + 0.95 * 0.9 * last
        rows.append(last)
    trl_adv = torch.stack(rows[::-1], dim=1)
    torch.testing.assert_close(adv, torch.where(mask, trl_adv, 0.0))


def test_gae_skips_interior_masked_positions():
    """A mask with holes (left padding, an interior masked span): the real tokens form the
    trajectory, as if the masked positions were cut out."""
    g = torch.Generator().manual_seed(3)
    rewards, values = torch.randn(2, 8, generator=g), torch.randn(2, 8, generator=g)
    mask = T([[0, 0, 1, 1, 0, 0, 1, 1], [1, 0, 1, 0, 1, 0, 1, 0]], dtype=torch.bool)
    adv, ret = gae(rewards, values, mask, 0.9, 0.8)
    for b in range(2):
        idx = mask[b].nonzero().flatten()
        exp_adv, exp_ret = gae_python(rewards[b, idx].tolist(), values[b, idx].tolist(), 0.9, 0.8)
        close(adv[b, idx], exp_adv, atol=1e-5)
        close(ret[b, idx], exp_ret, atol=1e-5)
        assert (adv[b][~mask[b]] == 0).all()


def test_rloo_hand_worked():
    """k = 3, scores [1, 2, 6 | 0, 0, 3]:
    A_0 = 1 − (2 + 6)/2 = −3, A_1 = 2 − (1 + 6)/2 = −1.5, A_2 = 6 − (1 + 2)/2 = 4.5
    (= 3/2·(r − 3)); second prompt: 0 − 1.5, 0 − 1.5, 3 − 0 → [−1.5, −1.5, 3].
    Each group's advantages sum to 0."""
    adv = rloo_advantages(T([1.0, 2.0, 6.0, 0.0, 0.0, 3.0]), k=3)
    close(adv, [-3.0, -1.5, 4.5, -1.5, -1.5, 3.0])
    close(adv.view(2, 3).sum(1), [0.0, 0.0])
    with pytest.raises(ValueError):
        rloo_advantages(T([1.0, 2.0, 3.0]), k=2)
    with pytest.raises(ValueError):
        rloo_advantages(T([1.0, 2.0]), k=1)


def test_grpo_hand_worked():
    """k = 3, scores [1, 2, 6 | 5, 5, 5]: mean 3, unbiased std sqrt((4 + 1 + 9)/2) = sqrt 7
    = 2.645751; A = [−2, −1, 3]/(2.645751 + 1e-4) = [−0.755900, −0.377950, 1.133850].
    A constant group has std 0: A = 0/1e-4 = 0. scale=False (Dr. GRPO): [−2, −1, 3, 0, 0, 0]."""
    scores = T([1.0, 2.0, 6.0, 5.0, 5.0, 5.0])
    d = math.sqrt(7) + 1e-4
    close(grpo_advantages(scores, k=3), [-2 / d, -1 / d, 3 / d, 0.0, 0.0, 0.0])
    close(grpo_advantages(scores, k=3, scale=False), [-2.0, -1.0, 3.0, 0.0, 0.0, 0.0])
    close(grpo_advantages(T([1.0, 2.0, 6.0]), k=3)[0], -0.755900)


def test_whiten_advantages_ignores_padding():
    """Whitened advantages have masked mean 0 and unbiased masked variance 1; padding stays 0."""
    adv = torch.randn(3, 6, generator=torch.Generator().manual_seed(4)) * 4 + 2
    mask = torch.arange(6).expand(3, 6) < T([[6], [2], [4]])
    w = whiten(adv, mask)
    close(masked_mean(w, mask), 0.0, atol=1e-5)
    close(w[mask].var(), 1.0, atol=1e-4)
    assert (w[~mask] == 0).all()
