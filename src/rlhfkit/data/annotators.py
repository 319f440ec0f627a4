"""Simulated annotators: AI feedback standing in for people in the demo (pluggable).

An annotator judges a pair the way the label app records a person: a point of the 8-point
Likert scale (``rlhfkit.data.likert``, documented in docs/data.md). The default
annotator prefers the warmer, more positive reply by the VADER sentiment lexicon, with
Bradley–Terry label noise: it prefers A with probability σ((s_A − s_B) / τ), so near-equal
replies are coin flips and clear differences are judged consistently, like human labellers.
The noise-free preference (the sign of s_A − s_B) is the demo's oracle.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from rlhfkit.data import likert


class Annotator(Protocol):
    def judge(self, prompt: str, response_a: str, response_b: str) -> int:
        """The Likert value 1..8 (1: A much better, 8: B much better)."""


class VaderSentiment:
    """The VADER compound score in [-1, 1]: the oracle of the demo."""

    def __init__(self):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self._analyzer = SentimentIntensityAnalyzer()

    def __call__(self, texts: list[str]) -> list[float]:
        return [self._analyzer.polarity_scores(t or "")["compound"] for t in texts]


def vader_reward(prompts: list, completions: list) -> list[float]:
    """A reward function (``rlhfkit.data.annotators:vader_reward``): the oracle score itself."""
    return _shared_vader()(list(completions))


_VADER: VaderSentiment | None = None


def _shared_vader() -> VaderSentiment:
    global _VADER
    if _VADER is None:
        _VADER = VaderSentiment()
    return _VADER


@dataclass
class NoisyBradleyTerryAnnotator:
    """Prefers the higher ``score`` with probability σ(Δ / temperature); Likert from its confidence."""

    score: Callable[[list[str]], list[float]]
    temperature: float = 0.25
    seed: int = 0

    def __post_init__(self):
        self._rng = random.Random(self.seed)

    def judge(self, prompt: str, response_a: str, response_b: str) -> int:
        s_a, s_b = self.score([response_a, response_b])
        p_a = 1.0 / (1.0 + math.exp(-(s_a - s_b) / self.temperature))
        a_preferred = self._rng.random() < p_a
        confidence = p_a if a_preferred else 1.0 - p_a   # how sure the annotator was of its choice
        steps = 0 if confidence < 0.6 else 1 if confidence < 0.75 else 2 if confidence < 0.9 else 3
        return likert.from_preference(a_preferred, steps)


def vader_annotator(temperature: float = 0.25, seed: int = 0) -> NoisyBradleyTerryAnnotator:
    return NoisyBradleyTerryAnnotator(_shared_vader(), temperature, seed)
