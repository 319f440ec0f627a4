"""KL-penalty coefficient controllers (Ziegler et al. 2019, "Fine-Tuning Language Models from
Human Preferences", §2.2).

Both controllers expose ``.value`` (the current β), ``.update(current_kl, n_steps)`` and
``state_dict()`` / ``load_state_dict()`` (plain Python floats, JSON-friendly) so that a
resumed run continues with exactly the coefficient it stopped with.
"""

from __future__ import annotations

from typing import Any

__all__ = ["FixedKLController", "AdaptiveKLController", "KLController", "kl_controller_from_state"]


class FixedKLController:
    """A constant KL coefficient β; ``update`` does nothing."""

    kind = "fixed"

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Keep β unchanged; returns it."""
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_kind(state, self.kind)
        self.value = float(state["value"])

    def __repr__(self) -> str:
        return f"FixedKLController(kl_coef={self.value})"


class AdaptiveKLController:
    """Proportional controller that steers the measured KL towards ``target``.

        e    = clip(KL_current / KL_target − 1, −0.2, 0.2)
        β   ← β · (1 + e · n_steps / horizon)

    ``n_steps`` is the number of samples (episodes) the KL was measured on, ``horizon`` the
    number of samples over which an error is corrected (Ziegler et al.: 10 000). The clip
    bounds one update to a factor in [1 − 0.2·n/H, 1 + 0.2·n/H].
    """

    kind = "adaptive"

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if target <= 0:
            raise ValueError(f"AdaptiveKLController: target must be > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"AdaptiveKLController: horizon must be > 0, got {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Apply one proportional update from the measured KL; returns the new β."""
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        mult = 1.0 + proportional_error * n_steps / self.horizon
        self.value *= mult
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_kind(state, self.kind)
        self.value = float(state["value"])
        self.target = float(state["target"])
        self.horizon = float(state["horizon"])

    def __repr__(self) -> str:
        return f"AdaptiveKLController(value={self.value}, target={self.target}, horizon={self.horizon})"


KLController = FixedKLController | AdaptiveKLController


_FROM_STATE = {
    FixedKLController.kind: lambda s: FixedKLController(s["value"]),
    AdaptiveKLController.kind: lambda s: AdaptiveKLController(s["value"], s["target"], s["horizon"]),
}


def kl_controller_from_state(state: dict[str, Any]) -> KLController:
    """Rebuild a controller from its ``state_dict()``."""
    try:
        build = _FROM_STATE[state["kind"]]
    except KeyError:
        raise ValueError(f"unknown KL controller state: {state!r}") from None
    return build(state)


def _check_kind(state: dict[str, Any], kind: str) -> None:
    if state.get("kind", kind) != kind:
        raise ValueError(f"cannot load a {state.get('kind')!r} KL controller state into a {kind!r} controller")
