"""rlhfkit: the whole RLHF loop in one toolkit."""

__version__ = "0.1.0"


def load_reward_model(path: str, **kwargs):
    """Load a reward model saved by ``rlhfkit rm``; ``.score(prompts, completions) -> list[float]``."""
    from rlhfkit.models.reward import load_reward_model as _load

    return _load(path, **kwargs)


def load_prm(path: str, **kwargs):
    """Load a process reward model saved by ``rlhfkit prm``; ``.score_steps(prompts, steps) ->
    list[list[float]]`` (the probability that each step is correct) and ``.score(prompts,
    completions, aggregate="min") -> list[float]`` (completions split into steps at its separator)."""
    from rlhfkit.models.prm import load_prm as _load

    return _load(path, **kwargs)


__all__ = ["load_prm", "load_reward_model", "__version__"]
