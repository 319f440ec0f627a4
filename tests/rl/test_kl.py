"""KL-coefficient controllers against hand calculation, and exact resume."""

from __future__ import annotations

import json

import pytest

from rlhfkit.rl.kl_control import AdaptiveKLController, FixedKLController, kl_controller_from_state


def test_fixed_controller():
    """β stays 0.05 whatever the KL; the state round-trips."""
    ctl = FixedKLController(0.05)
    assert ctl.update(100.0, 512) == 0.05 and ctl.value == 0.05
    assert kl_controller_from_state(ctl.state_dict()).value == 0.05


def test_adaptive_controller_hand_worked():
    """β₀ = 0.2, target 6, horizon 10 000.
    KL = 8, n = 256: e = clip(8/6 − 1 = 0.3333, ±0.2) = 0.2; β = 0.2·(1 + 0.2·256/10⁴)
    = 0.2·1.00512 = 0.201024.
    KL = 5.4, n = 512: e = 5.4/6 − 1 = −0.1; β = 0.201024·(1 − 0.1·512/10⁴)
    = 0.201024·0.99488 = 0.19999476 (to 8 places).
    KL = 0, n = 10 000: e = clip(−1) = −0.2; β = 0.19999476·0.8 = 0.15999581."""
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10_000)
    assert ctl.update(8.0, 256) == pytest.approx(0.201024, abs=1e-12)
    assert ctl.update(5.4, 512) == pytest.approx(0.19999475712, abs=1e-12)
    assert ctl.update(0.0, 10_000) == pytest.approx(0.19999475712 * 0.8, abs=1e-12)
    assert ctl.value == pytest.approx(0.15999581, abs=1e-8)


def test_adaptive_controller_exact_resume():
    """Run 6 updates uninterrupted; separately run 3, save the state through JSON, rebuild
    and run the last 3: the coefficients are bit-identical."""
    kls = [3.0, 9.5, 6.2, 0.4, 12.0, 5.9]
    full = AdaptiveKLController(0.1, 6.0, 1000)
    for kl in kls:
        full.update(kl, 64)
    first = AdaptiveKLController(0.1, 6.0, 1000)
    for kl in kls[:3]:
        first.update(kl, 64)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = kl_controller_from_state(state)
    other = AdaptiveKLController(0.5, 1.0, 1)
    other.load_state_dict(state)
    for kl in kls[3:]:
        resumed.update(kl, 64)
        other.update(kl, 64)
    assert resumed.value == full.value == other.value
    with pytest.raises(ValueError):
        FixedKLController(0.1).load_state_dict(state)
