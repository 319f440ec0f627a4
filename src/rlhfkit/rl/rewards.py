"""Reward sources behind one call: ``source(prompts, completions) -> list[float]``.

A reward spec ``R`` (``--reward``) is one of:
- a reward-model folder written by ``rlhfkit rm`` (re-tokenised with its own tokenizer, so the
  policy and the reward model may use different tokenizers);
- a Python function ``path/to/file.py:function`` or ``package.module:function`` called as
  ``function(prompts, completions) -> list[float]`` with prompts as plain strings (the last
  user turn and its context, see :func:`rlhfkit.data.chat.prompt_text`);
- an HTTP endpoint ``http(s)://...``: POST ``{"prompts": [...], "completions": [...]}``,
  answer ``{"scores": [...]}`` (or a bare JSON list).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable

from rlhfkit.data.chat import prompt_text
from rlhfkit.errors import InputError

RewardFn = Callable[[list, list], list]


def check_reward_spec(spec: str) -> list[str]:
    """Problems with a reward spec, found without loading anything heavy."""
    if not spec:
        return ["--reward is required"]
    if spec.startswith(("http://", "https://")):
        return []
    if os.path.isdir(spec):
        if not os.path.exists(os.path.join(spec, "config.json")):
            return [f"--reward {spec}: a folder without config.json is not a reward model"]
        return []
    target, sep, fn = spec.rpartition(":")
    if not sep or not fn or not target:
        return [f"--reward {spec!r}: expected a reward-model folder, file.py:function, module:function or an http URL"]
    if target.endswith(".py") and not os.path.exists(target):
        return [f"--reward {spec}: no such file: {target}"]
    return []


class RewardSource:
    """A callable reward with a readable name; scores are floats, one per completion."""

    def __init__(self, fn: RewardFn, name: str, wants_raw_prompts: bool = False):
        self.fn, self.name, self.wants_raw_prompts = fn, name, wants_raw_prompts

    def __call__(self, prompts: list, completions: list) -> list[float]:
        shown = prompts if self.wants_raw_prompts else [prompt_text(p) for p in prompts]
        scores = self.fn(shown, list(completions))
        try:
            scores = [float(s) for s in scores]
        except (TypeError, ValueError):
            raise InputError(f"reward {self.name}: expected a list of numbers, got {scores!r:.200}") from None
        if len(scores) != len(completions):
            raise InputError(f"reward {self.name}: returned {len(scores)} scores for {len(completions)} completions")
        return scores


def _load_python(spec: str) -> RewardFn:
    target, _, fn_name = spec.rpartition(":")
    if target.endswith(".py"):
        name = f"rlhfkit_reward_{abs(hash(os.path.abspath(target)))}"
        module_spec = importlib.util.spec_from_file_location(name, target)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise InputError(f"--reward {spec}: cannot import {target} ({e})") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise InputError(f"--reward {spec}: {target} has no function {fn_name}")
    return fn


def _http(url: str) -> RewardFn:
    import httpx

    def call(prompts, completions):
        try:
            r = httpx.post(url, json={"prompts": prompts, "completions": completions}, timeout=120)
            r.raise_for_status()
        except httpx.HTTPError as e:
            raise InputError(f"--reward {url}: request failed ({e})") from None
        body = r.json()
        return body["scores"] if isinstance(body, dict) else body

    return call


def load_reward(spec: str, dtype: str = "float32", device=None) -> RewardSource:
    """Resolve ``--reward`` into a :class:`RewardSource`; a reward model is loaded on ``device``
    (default: :func:`rlhfkit.models.loading.default_device`) in ``dtype``."""
    problems = check_reward_spec(spec)
    if problems:
        raise InputError(problems)
    if spec.startswith(("http://", "https://")):
        return RewardSource(_http(spec), spec)
    if os.path.isdir(spec):
        from rlhfkit.models.reward import load_reward_model

        rm = load_reward_model(spec, dtype, device=device)
        return RewardSource(rm.score, spec, wants_raw_prompts=True)
    return RewardSource(_load_python(spec), spec)
