"""Prompt sets shipped by PyPI packages (offline): the chatterbot-corpus English conversations."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

from rlhfkit.errors import InputError


def chatterbot_prompts(min_words: int = 2) -> list[str]:
    """The opening utterance of every English chatterbot-corpus conversation, de-duplicated,
    in a stable order (files sorted by name, conversations in file order)."""
    import yaml

    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the demo's prompts need the package 'chatterbot-corpus' (pip install chatterbot-corpus)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data" / "english"
    seen, prompts = set(), []
    for path in sorted(folder.glob("*.yml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for conversation in data.get("conversations") or []:
            if not conversation or not isinstance(conversation[0], str):
                continue
            text = " ".join(conversation[0].split())
            key = text.lower().rstrip("?!. ")
            if len(text.split()) >= min_words and key not in seen:
                seen.add(key)
                prompts.append(text)
    return prompts


def split_prompts(prompts: list[str], held_out: int, seed: int) -> tuple[list[str], list[str]]:
    """A seeded shuffle into (train, held_out)."""
    order = list(prompts)
    random.Random(seed).shuffle(order)
    return order[held_out:], order[:held_out]
