"""rlhfkit: the whole RLHF loop in one toolkit."""

__version__ = "0.1.0"


def load_reward_model(path: str, **kwargs):
    """Load a reward model saved by ``rlhfkit rm``; ``.score(prompts, completions) -> list[float]``."""
    from rlhfkit.models.reward import load_reward_model as _load

    return _load(path, **kwargs)


__all__ = ["load_reward_model", "__version__"]
