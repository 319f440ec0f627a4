"""Reward sources behind one call: ``source(prompts, completions) -> list[float]``.

A reward spec ``R`` (``--reward``) is one of:
- a reward-model folder written by ``rlhfkit rm`` (re-tokenised with its own tokenizer, so the
  policy and the reward model may use different tokenizers);
- ``prm:PATH``, a process reward model written by ``rlhfkit prm``: each completion is split into
  steps at the PRM's separator, every step scored, and the step probabilities reduced to one
  score by an aggregate (``min``, ``prod`` or ``last``: :data:`rlhfkit.models.prm.AGGREGATES`);
- a Python function ``path/to/file.py:function`` or ``package.module:function`` called as
  ``function(prompts, completions) -> list[float]`` with prompts as plain strings (the last
  user turn and its context, see :func:`rlhfkit.data.chat.prompt_text`);
- an HTTP endpoint ``http(s)://...``: POST ``{"prompts": [...], "completions": [...]}``,
  answer ``{"scores": [...]}`` (or a bare JSON list).

Several rewards (``--reward`` repeated) make one combined source, :func:`build_reward`, which
``ppo``, ``generate --best-of`` and ``rejection-sampling`` all call. Each reward has a name:
``NAME=SPEC`` gives it; otherwise it is the function's name, the reward-model folder's name or
the URL's host (:func:`reward_name`). The combined score is the weighted sum Σ_i w_i·s_i
(``--reward-weight``, default 1 each), and with ``--reward-gate NAME:THRESHOLD`` Llama 2's
safety-first rule (Touvron et al. 2023, eq. 3): where NAME's score is below THRESHOLD the
combined score is NAME's score alone (:func:`combine_scores`).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
from collections.abc import Callable, Sequence
from urllib.parse import urlparse

from rlhfkit.data.chat import prompt_text
from rlhfkit.errors import InputError

RewardFn = Callable[[list, list], list]
PRM_PREFIX = "prm:"


def check_reward_spec(spec: str) -> list[str]:
    """Problems with a reward spec, found without loading anything heavy."""
    if not spec:
        return ["--reward is required"]
    if spec.startswith(("http://", "https://")):
        return []
    if spec.startswith(PRM_PREFIX):
        return _prm_spec_problems(spec, spec[len(PRM_PREFIX):])
    if os.path.isdir(spec):
        if not os.path.exists(os.path.join(spec, "config.json")):
            return [f"--reward {spec}: a folder without config.json is not a reward model"]
        return []
    target, sep, fn = spec.rpartition(":")
    if not sep or not fn or not target:
        return [f"--reward {spec!r}: expected a reward-model folder, file.py:function, module:function, "
                "an http URL or prm:PATH (a process reward model)"]
    if target.endswith(".py") and not os.path.exists(target):
        return [f"--reward {spec}: no such file: {target}"]
    return []


def _prm_spec_problems(spec: str, path: str) -> list[str]:
    from rlhfkit.models.prm import is_prm_dir

    if not os.path.isdir(path):
        return [f"--reward {spec}: no such folder: {path!r} (expected prm:PATH, a folder written by rlhfkit prm)"]
    if not is_prm_dir(path):
        return [f"--reward {spec}: {path} is not a process reward model (its config.json names no "
                "...ForTokenClassification architecture; rlhfkit prm writes one)"]
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


def load_reward(spec: str, dtype: str = "float32", device=None, prm_aggregate: str = "min") -> RewardSource:
    """Resolve ``--reward`` into a :class:`RewardSource`; a reward model is loaded on ``device``
    (default: :func:`rlhfkit.models.loading.default_device`) in ``dtype``. ``prm_aggregate``: how
    a ``prm:`` reward reduces the step probabilities of a completion to its score."""
    problems = check_reward_spec(spec)
    if problems:
        raise InputError(problems)
    if spec.startswith(("http://", "https://")):
        return RewardSource(_http(spec), spec)
    if spec.startswith(PRM_PREFIX):
        from functools import partial

        from rlhfkit.models.prm import load_prm

        prm = load_prm(spec[len(PRM_PREFIX):], dtype, device=device)
        return RewardSource(partial(prm.score, aggregate=prm_aggregate), spec, wants_raw_prompts=True)
    if os.path.isdir(spec):
        from rlhfkit.models.reward import load_reward_model

        rm = load_reward_model(spec, dtype, device=device)
        return RewardSource(rm.score, spec, wants_raw_prompts=True)
    return RewardSource(_load_python(spec), spec)


# ---------------------------------------------------------------- several rewards

_NAMED = re.compile(r"^([A-Za-z_][A-Za-z0-9_.-]*)=(.+)$")


def split_named(spec: str) -> tuple[str, str]:
    """``NAME=SPEC`` -> (NAME, SPEC); a bare spec -> (:func:`reward_name` of it, spec)."""
    match = _NAMED.match(spec)
    if match:
        return match.group(1), match.group(2)
    return reward_name(spec), spec


def reward_name(spec: str) -> str:
    """The default name of a reward: the function of ``file.py:function`` / ``module:function``,
    the host of an http(s) URL, else the last part of the path (a reward-model folder)."""
    if spec.startswith(("http://", "https://")):
        return urlparse(spec).hostname or spec
    target, sep, fn = spec.rpartition(":")
    last = fn if sep and fn and target and not os.path.isdir(spec) else spec
    return os.path.basename(os.path.normpath(last)) or spec


def parse_gate(gate: str) -> tuple[str, float]:
    """``NAME:THRESHOLD`` -> (NAME, THRESHOLD); ValueError when it is not of that form."""
    name, sep, threshold = gate.rpartition(":")
    if not sep or not name:
        raise ValueError(f"--reward-gate {gate!r}: expected NAME:THRESHOLD")
    try:
        return name, float(threshold)
    except ValueError:
        raise ValueError(f"--reward-gate {gate!r}: the threshold {threshold!r} is not a number") from None


def check_reward_combination(specs: Sequence[str], weights: Sequence[float] = (), gate: str = "",
                             required: bool = True) -> list[str]:
    """Problems of ``--reward`` (each spec), ``--reward-weight`` and ``--reward-gate``, found
    without loading anything: one weight per reward, distinct names, a gate naming a reward."""
    specs = [specs] if isinstance(specs, str) else list(specs)
    if not specs:
        return (["--reward is required"] if required else []) + (
            ["--reward-weight needs --reward"] if weights else []) + (["--reward-gate needs --reward"] if gate else [])
    problems, names = [], []
    for spec in specs:
        name, bare = split_named(spec)
        problems += check_reward_spec(bare)
        if name in names:
            problems.append(f"--reward: two rewards are named {name!r}; name one NAME=SPEC")
        names.append(name)
    if weights and len(weights) != len(specs):
        problems.append(f"--reward-weight: {len(weights)} weight(s) for {len(specs)} reward(s); give one per "
                        "--reward, in order")
    if gate:
        try:
            gate_name, _ = parse_gate(gate)
            if gate_name not in names:
                problems.append(f"--reward-gate {gate!r}: no reward named {gate_name!r} (the rewards: "
                                f"{', '.join(names)})")
        except ValueError as e:
            problems.append(str(e))
    return problems


def combine_scores(scores: Sequence[Sequence[float]], weights: Sequence[float], gate: int | None = None,
                   threshold: float = 0.0) -> list[float]:
    """The combined score of each sample from ``scores[i][j]``, reward i's score of sample j:

        R_c = s_g                  where s_g < threshold   (gate g: Llama 2's safety-first rule)
        R_c = Σ_i w_i · s_i        elsewhere
    """
    combined = [sum(w * s[j] for w, s in zip(weights, scores)) for j in range(len(scores[0]) if scores else 0)]
    if gate is not None:
        combined = [g if g < threshold else c for g, c in zip(scores[gate], combined)]
    return combined


class CombinedReward(RewardSource):
    """Several rewards as one source: ``__call__`` gives the combined score (:func:`combine_scores`);
    :meth:`score_parts` also gives each reward's own scores, by name."""

    def __init__(self, parts: dict[str, RewardSource], weights: Sequence[float], gate: str = ""):
        self.parts, self.weights = parts, list(weights)
        gate_name, self.threshold = parse_gate(gate) if gate else ("", 0.0)
        self.gate = list(parts).index(gate_name) if gate else None
        super().__init__(self._combined, "+".join(parts), wants_raw_prompts=True)

    def score_parts(self, prompts: list, completions: list) -> tuple[list[float], dict[str, list[float]]]:
        parts = {name: source(prompts, completions) for name, source in self.parts.items()}
        return combine_scores(list(parts.values()), self.weights, self.gate, self.threshold), parts

    def _combined(self, prompts: list, completions: list) -> list[float]:
        return self.score_parts(prompts, completions)[0]


def score_parts(reward: Callable, prompts: list, completions: list) -> tuple[list[float], dict[str, list[float]]]:
    """(scores, each component's scores by name): the components of a :class:`CombinedReward`, none
    of a single reward."""
    if isinstance(reward, CombinedReward):
        return reward.score_parts(prompts, completions)
    return list(reward(prompts, completions)), {}


def build_reward(specs: str | Sequence[str], weights: Sequence[float] = (), gate: str = "", dtype: str = "float32",
                 device=None, **options) -> RewardSource:
    """The one reward source of ``--reward`` (repeatable), ``--reward-weight`` and ``--reward-gate``:
    a single reward as :func:`load_reward` gives it, several (or a weight, or a gate) as a
    :class:`CombinedReward`. ``options`` go to every :func:`load_reward`."""
    specs = [specs] if isinstance(specs, str) else list(specs)
    problems = check_reward_combination(specs, weights, gate)
    if problems:
        raise InputError(problems)
    if len(specs) == 1 and not weights and not gate:
        return load_reward(split_named(specs[0])[1], dtype, device, **options)
    parts = {name: load_reward(bare, dtype, device, **options) for name, bare in map(split_named, specs)}
    return CombinedReward(parts, [float(w) for w in weights] or [1.0] * len(specs), gate)
