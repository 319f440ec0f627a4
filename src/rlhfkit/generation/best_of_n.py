"""Best-of-N sampling: draw N completions per prompt, score them with a reward, keep the best.

The simplest inference-time alignment method and a strong baseline for the trained ones
(its KL to the policy is at most log N − (N−1)/N; Stiennon et al. 2020, Beirami et al. 2024).
Sampling goes through :mod:`rlhfkit.generation.decoding`; the reward is any
``(prompts, completions) -> list[float]`` callable or a ``--reward`` spec
(:func:`rlhfkit.rl.rewards.load_reward`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import NamedTuple

from rlhfkit.generation.decoding import SamplingParams, generate_chat


class BestOfN(NamedTuple):
    """The N completions of one prompt, their scores, and the highest-scoring completion."""

    completions: list[str]
    scores: list[float]
    best: str

    @property
    def best_index(self) -> int:
        return argmax(self.scores)


def argmax(scores: list[float]) -> int:
    """Index of the largest score; the first one on ties."""
    if not scores:
        raise ValueError("argmax of an empty list")
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def score_completions(reward, prompts: list, completions: list[list[str]]) -> list[list[float]]:
    """Scores of every completion of every prompt, in one call of ``reward`` (it batches itself)."""
    flat_prompts = [p for p, rows in zip(prompts, completions) for _ in rows]
    flat = [c for rows in completions for c in rows]
    scores = list(reward(flat_prompts, flat)) if flat else []
    if len(scores) != len(flat):
        raise ValueError(f"the reward returned {len(scores)} scores for {len(flat)} completions")
    out, i = [], 0
    for rows in completions:
        out.append([float(s) for s in scores[i:i + len(rows)]])
        i += len(rows)
    return out


def select_best(completions: list[list[str]], scores: list[list[float]]) -> list[BestOfN]:
    return [BestOfN(list(c), list(s), c[argmax(s)]) for c, s in zip(completions, scores)]


def best_of_n(model, tokenizer, prompts: list, reward: Callable | str, n: int,
              params: SamplingParams | None = None, batch_size: int = 8,
              max_prompt_length: int | None = None) -> list[BestOfN]:
    """For each prompt: ``n`` sampled completions, their reward scores, and the best one.

    ``reward``: a callable ``(prompts, completions) -> list[float]`` or a reward spec string
    (reward-model folder, ``file.py:function``, ``module:function``, http URL). ``params``
    defaults to plain sampling (temperature 1); its ``n`` is replaced by ``n``.
    """
    if n < 1:
        raise ValueError("n must be >= 1")
    if isinstance(reward, str):
        from rlhfkit.rl.rewards import load_reward

        reward = load_reward(reward, device=next(model.parameters()).device)  # beside the policy
    params = replace(params or SamplingParams(strategy="sample"), n=n)
    completions = generate_chat(model, tokenizer, prompts, params, batch_size, max_prompt_length)
    return select_best(completions, score_completions(reward, prompts, completions))
