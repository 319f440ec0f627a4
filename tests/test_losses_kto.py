"""KTO's losses and reference point (rlhfkit.losses), worked by hand.

The comparison with TRL 1.16's KTOTrainer on a real model is tests/recipes/test_kto_trl.py.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from rlhfkit.losses import UNPAIRED_LOSSES, apo_zero_unpaired_loss, kto_loss, kto_reference_point

T = torch.tensor

# r = log π − log π_ref = [1, −1, 0, 1]; labels desirable, undesirable, desirable, undesirable
POLICY, REF = T([-2.0, -3.0, -1.0, -4.0]), T([-3.0, -2.0, -1.0, -5.0])
DESIRABLE = T([True, False, True, False])


def close(actual, expected, atol=1e-6):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float64),
                               torch.as_tensor(expected, dtype=torch.float64), atol=atol, rtol=0)


def test_kto_loss_hand_worked():
    """β = 0.5, z_ref = 0.4, λ_D = 2, λ_U = 0.5:
    desirable r=1:     2·(1 − σ(0.5·(1 − 0.4)))    = 2·σ(−0.3)   = 0.851115
    undesirable r=−1:  0.5·(1 − σ(0.5·(0.4 + 1)))  = 0.5·σ(−0.7) = 0.165906
    desirable r=0:     2·(1 − σ(0.5·(0 − 0.4)))    = 2·σ(0.2)    = 1.099668
    undesirable r=1:   0.5·(1 − σ(0.5·(0.4 − 1)))  = 0.5·σ(0.3)  = 0.287221
    rewards β·r = [0.5, −0.5, 0, 0.5] (z_ref does not enter them)."""
    losses, rewards = kto_loss(POLICY, REF, DESIRABLE, T(0.4), beta=0.5, desirable_weight=2.0,
                               undesirable_weight=0.5)
    close(losses, [0.851115, 0.165906, 1.099668, 0.287221])
    close(rewards, [0.5, -0.5, 0.0, 0.5])


def test_apo_zero_unpaired_is_kto_at_a_zero_reference_point():
    """β = 0.5: desirable 1 − σ(β·r), undesirable σ(β·r):
    [1 − σ(0.5), σ(−0.5), 1 − σ(0), σ(0.5)] = [0.377541, 0.377541, 0.5, 0.622459]; the
    reference point passed is ignored."""
    losses, rewards = apo_zero_unpaired_loss(POLICY, REF, DESIRABLE, T(3.0), beta=0.5)
    close(losses, [0.377541, 0.377541, 0.5, 0.622459])
    close(losses, kto_loss(POLICY, REF, DESIRABLE, 0.0, beta=0.5)[0])
    close(rewards, [0.5, -0.5, 0.0, 0.5])


def test_reference_point_mean_clamped_detached_and_gathered():
    """mean([0.2, −0.6, 1.0]) = 0.2; mean([−1, 0.5]) = −0.25 → clamped to 0. Over two processes
    whose means are 0.2 and 0.6: 0.4. Means −0.3 and 0.1: the clamp acts on their mean −0.1 → 0
    (clamping each process first would give 0.05)."""
    logratios = T([0.2, -0.6, 1.0], requires_grad=True)
    z = kto_reference_point(logratios)
    close(z, 0.2)
    assert not z.requires_grad
    close(kto_reference_point(T([-1.0, 0.5])), 0.0)

    def gather_with(other):
        return lambda mine: torch.cat([mine, T([other])])

    close(kto_reference_point(T([0.2, 0.2]), gather_with(0.6)), 0.4)
    close(kto_reference_point(T([-0.3]), gather_with(0.1)), 0.0)


def test_kto_gradient_pushes_desirable_up_and_undesirable_down():
    policy = POLICY.clone().requires_grad_(True)
    losses, _ = kto_loss(policy, REF, DESIRABLE, T(0.4), beta=0.5)
    losses.sum().backward()
    assert (policy.grad[DESIRABLE] < 0).all()    # raising log π(y) of a desirable y lowers its loss
    assert (policy.grad[~DESIRABLE] > 0).all()


def test_unpaired_registry():
    assert {n for n, e in UNPAIRED_LOSSES.items() if e.reference_point} == {"kto"}
    for entry in UNPAIRED_LOSSES.values():
        params = inspect.signature(entry.fn).parameters
        assert {"beta", "desirable_weight", "undesirable_weight", "reference_point"} <= set(params)
        losses, rewards = entry.fn(POLICY, REF, DESIRABLE, T(0.0), beta=0.1)
        assert losses.shape == rewards.shape == (4,)


@pytest.mark.parametrize("desirable_weight, undesirable_weight", [(1.0, 1.0), (3.0, 0.25)])
def test_weights_scale_each_side_only(desirable_weight, undesirable_weight):
    plain, _ = kto_loss(POLICY, REF, DESIRABLE, T(0.4), beta=0.5)
    weighted, _ = kto_loss(POLICY, REF, DESIRABLE, T(0.4), beta=0.5, desirable_weight=desirable_weight,
                           undesirable_weight=undesirable_weight)
    close(weighted[DESIRABLE], desirable_weight * plain[DESIRABLE])
    close(weighted[~DESIRABLE], undesirable_weight * plain[~DESIRABLE])
