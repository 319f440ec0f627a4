"""The one data schema (TRL-compatible), validated record by record.

- SFT: ``{"messages": [...]}`` or ``{"prompt", "completion"}`` (strings or message lists).
- Preference: ``{"prompt", "chosen", "rejected"}`` (strings or message lists), optional
  ``margin`` (float). Without ``prompt``, message-list ``chosen``/``rejected`` share their
  leading turns as the prompt (TRL's implicit prompt). Records marked ``"tie": true`` (kept ties
  of ``rlhfkit label export --keep-ties``) carry no preferred side and are skipped.
- Ranking: ``{"prompt", "completions": [...], "ranking": [...]}`` where ``ranking`` lists the
  indices of ``completions`` from best to worst (a permutation of 0..K-1).
- Unpaired (KTO, TRL's unpaired preference): ``{"prompt", "completion", "label": bool}``
  (``label`` true: a desirable completion); a preference pair gives both of its sides (chosen
  desirable, rejected undesirable), as TRL's ``unpair_preference_dataset``.
- Prompts: ``{"prompt": str | messages}`` or ``{"messages": [...]}``; other fields are kept.
- Scored (offline RL): an SFT record with a numeric ``reward`` (``{"prompt", "completion",
  "reward"}``), or without one, or a preference record, to be scored by a reward function: each
  side of a pair is then one scored completion.


- Stepwise supervision (process reward models): ``{"prompt", "completions": [step, ...],
  "labels": [bool per step]}`` (TRL's format); a label says the chain is still correct after
  that step.

A prompt is either a string or a list of ``{"role", "content"}`` messages; completions are
strings (one assistant turn) or lists of assistant messages.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

from rlhfkit.data.io import Record, read_records
from rlhfkit.errors import InputError

Message = dict
Prompt = str | list  # str or list[Message]
ROLES = {"system", "user", "assistant", "tool"}


@dataclass(frozen=True)
class SFTExample:
    prompt: Prompt               # a string, or the messages before the first trained turn
    completion: Any              # a string, or the remaining messages (assistant turns trained)
    source: Record | None = None


@dataclass(frozen=True)
class PreferenceExample:
    prompt: Prompt
    chosen: Any
    rejected: Any
    margin: float | None = None
    source: Record | None = None


@dataclass(frozen=True)
class RankingExample:
    prompt: Prompt
    completions: list
    ranking: list[int]           # completion indices, best first
    source: Record | None = None

    def pairs(self) -> list[PreferenceExample]:
        """All K(K-1)/2 (better, worse) pairs."""
        return [PreferenceExample(self.prompt, self.completions[a], self.completions[b], None, self.source)
                for a, b in itertools.combinations(self.ranking, 2)]


@dataclass(frozen=True)
class StepwiseExample:
    prompt: Prompt
    steps: list[str]             # the solution, one string per step
    labels: list[bool]           # per step: is the chain still correct after it
    source: Record | None = None


@dataclass(frozen=True)
class PromptExample:
    prompt: Prompt
    extra: dict = field(default_factory=dict)
    source: Record | None = None


@dataclass(frozen=True)
class UnpairedExample:
    prompt: Prompt
    completion: Any
    desirable: bool              # the record's ``label``
    source: Record | None = None


@dataclass(frozen=True)
class ScoredExample:
    prompt: Prompt
    completion: Any
    reward: float | None         # None: not in the record (a reward function scores it)
    source: Record | None = None


def _check_messages(rec: Record, name: str, value: Any, problems: list[str], *, assistant_only=False) -> bool:
    if not isinstance(value, list) or not value:
        problems.append(rec.problem(name, "expected a non-empty list of messages"))
        return False
    ok = True
    for i, m in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(m, dict):
            problems.append(rec.problem(where, "expected an object with 'role' and 'content'"))
            ok = False
            continue
        role = m.get("role")
        if role not in ROLES:
            problems.append(rec.problem(f"{where}.role", f"unknown role {role!r} (expected one of {sorted(ROLES)})"))
            ok = False
        elif assistant_only and role != "assistant":
            problems.append(rec.problem(f"{where}.role", f"expected 'assistant', got {role!r}"))
            ok = False
        if not isinstance(m.get("content"), str):
            problems.append(rec.problem(f"{where}.content", "expected a string"))
            ok = False
    return ok


def check_text_or_messages(rec, name, value, problems, *, assistant_only=False) -> bool:
    if isinstance(value, str):
        if not value.strip():
            problems.append(rec.problem(name, "is empty"))
            return False
        return True
    if isinstance(value, list):
        return _check_messages(rec, name, value, problems, assistant_only=assistant_only)
    if value is None:
        problems.append(rec.problem(name, "missing field"))
    else:
        problems.append(rec.problem(name, f"expected a string or a list of messages, got {type(value).__name__}"))
    return False


def parse_sft(rec: Record, problems: list[str]) -> SFTExample | None:
    d = rec.data
    if "messages" in d:
        msgs = d["messages"]
        if not _check_messages(rec, "messages", msgs, problems):
            return None
        first = next((i for i, m in enumerate(msgs) if m["role"] == "assistant"), None)
        if first is None:
            problems.append(rec.problem("messages", "no assistant message: nothing to train on"))
            return None
        return SFTExample(msgs[:first], msgs[first:], rec)
    if "prompt" not in d and "completion" not in d:
        problems.append(rec.problem(None, "missing field: expected 'messages' or 'prompt' and 'completion'"))
        return None
    return SFTExample(d["prompt"], d["completion"], rec) if _check_prompt_completion(rec, problems) else None


def _check_prompt_completion(rec: Record, problems: list[str]) -> bool:
    """Whether ``prompt`` and ``completion`` are valid and of one form (both strings or both messages)."""
    d = rec.data
    ok = check_text_or_messages(rec, "prompt", d.get("prompt"), problems)
    ok &= check_text_or_messages(rec, "completion", d.get("completion"), problems, assistant_only=True)
    if ok and isinstance(d["prompt"], str) != isinstance(d["completion"], str):
        problems.append(rec.problem("completion", "prompt and completion must both be strings or both message lists"))
        return False
    return ok


def _split_implicit_prompt(chosen: list, rejected: list):
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    return chosen[:n], chosen[n:], rejected[n:]


def parse_preference(rec: Record, problems: list[str]) -> list[PreferenceExample]:
    d = rec.data
    if d.get("tie") is True:  # `rlhfkit label export --keep-ties`: no preferred side to learn from
        return []
    if "completions" in d or "ranking" in d:
        r = parse_ranking(rec, problems)
        return r.pairs() if r else []
    ok = True
    if "prompt" in d:
        ok &= check_text_or_messages(rec, "prompt", d["prompt"], problems)
    for name in ("chosen", "rejected"):
        ok &= check_text_or_messages(rec, name, d.get(name), problems)
    margin = d.get("margin")
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))):
        problems.append(rec.problem("margin", f"expected a number, got {margin!r}"))
        ok = False
    if not ok:
        return []
    prompt, chosen, rejected = d.get("prompt"), d["chosen"], d["rejected"]
    if prompt is None:
        if not (isinstance(chosen, list) and isinstance(rejected, list)):
            problems.append(rec.problem("prompt", "missing field (needed when chosen/rejected are strings)"))
            return []
        prompt, chosen, rejected = _split_implicit_prompt(chosen, rejected)
        if not prompt:
            problems.append(rec.problem("prompt", "missing, and chosen/rejected share no leading turns"))
            return []
    if chosen == rejected:
        problems.append(rec.problem("chosen", "identical to 'rejected': the pair carries no preference"))
        return []
    return [PreferenceExample(prompt, chosen, rejected, None if margin is None else float(margin), rec)]


def parse_ranking(rec: Record, problems: list[str]) -> RankingExample | None:
    d = rec.data
    ok = check_text_or_messages(rec, "prompt", d.get("prompt"), problems)
    comps, ranking = d.get("completions"), d.get("ranking")
    if not isinstance(comps, list) or len(comps) < 2:
        problems.append(rec.problem("completions", "expected a list of at least 2 completions"))
        return None
    for i, c in enumerate(comps):
        ok &= check_text_or_messages(rec, f"completions[{i}]", c, problems)
    if not isinstance(ranking, list) or sorted(ranking) != list(range(len(comps))) \
            or any(isinstance(x, bool) for x in ranking):
        problems.append(rec.problem("ranking", f"expected a permutation of 0..{len(comps) - 1} (best first)"))
        return None
    return RankingExample(d["prompt"], comps, list(ranking), rec) if ok else None


def parse_prompt(rec: Record, problems: list[str]) -> PromptExample | None:
    d = rec.data
    if "messages" in d and "prompt" not in d:
        msgs = d["messages"]
        if not _check_messages(rec, "messages", msgs, problems):
            return None
        if msgs[-1]["role"] == "assistant":  # a finished conversation: prompt with what precedes the reply
            msgs = msgs[:-1]
            if not msgs:
                problems.append(rec.problem("messages", "holds only an assistant turn"))
                return None
        prompt = msgs
    else:
        if not check_text_or_messages(rec, "prompt", d.get("prompt"), problems):
            return None
        prompt = d["prompt"]
    extra = {k: v for k, v in d.items() if k not in ("prompt", "messages")}
    return PromptExample(prompt, extra, rec)


def parse_unpaired(rec: Record, problems: list[str]) -> list[UnpairedExample]:
    """A completion labelled desirable or not; a preference pair gives both of its sides."""
    d = rec.data
    if "completions" in d or "ranking" in d:  # a middle completion is neither desirable nor undesirable
        problems.append(rec.problem("completions", "a ranking is not unpaired feedback: expected "
                                    "{prompt, completion, label} or {prompt, chosen, rejected}"))
        return []
    if "chosen" in d or "rejected" in d:
        return [UnpairedExample(pair.prompt, side, desirable, rec) for pair in parse_preference(rec, problems)
                for side, desirable in ((pair.chosen, True), (pair.rejected, False))]
    ok = _check_prompt_completion(rec, problems)
    label = d.get("label")
    if not isinstance(label, bool):
        problems.append(rec.problem("label", "missing field (true: a desirable completion, false: an undesirable "
                                    "one)" if label is None else f"expected true or false, got {label!r}"))
        return []
    return [UnpairedExample(d["prompt"], d["completion"], label, rec)] if ok else []


def parse_scored(rec: Record, problems: list[str]) -> list[ScoredExample]:
    """A completion and its reward; a preference record gives both of its sides, unscored."""
    d = rec.data
    if "completions" in d or "ranking" in d:
        problems.append(rec.problem("completions", "a ranking is not a scored completion: expected "
                                    "{prompt, completion, reward} or {prompt, chosen, rejected}"))
        return []
    if "chosen" in d or "rejected" in d:
        return [ScoredExample(pair.prompt, side, None, rec) for pair in parse_preference(rec, problems)
                for side in (pair.chosen, pair.rejected)]
    example = parse_sft(rec, problems)
    reward = d.get("reward")
    if reward is not None and (isinstance(reward, bool) or not isinstance(reward, (int, float))
                               or not math.isfinite(reward)):
        problems.append(rec.problem("reward", f"expected a finite number, got {reward!r}"))
        return []
    if example is None:
        return []
    return [ScoredExample(example.prompt, example.completion, None if reward is None else float(reward), rec)]


def parse_stepwise(rec: Record, problems: list[str]) -> StepwiseExample | None:
    d = rec.data
    ok = check_text_or_messages(rec, "prompt", d.get("prompt"), problems)
    steps, labels = d.get("completions"), d.get("labels")
    if not isinstance(steps, list) or not steps:
        problems.append(rec.problem("completions", "expected a non-empty list of steps (strings)"))
        return None
    for i, step in enumerate(steps):
        if not isinstance(step, str) or not step.strip():
            problems.append(rec.problem(f"completions[{i}]", "expected a non-empty string"))
            ok = False
    if not isinstance(labels, list):
        problems.append(rec.problem("labels", "expected a list of true/false, one per step"))
        return None
    if len(labels) != len(steps):
        problems.append(rec.problem("labels", f"{len(labels)} label(s) for {len(steps)} step(s): "
                                    "expected one per step"))
        ok = False
    for i, label in enumerate(labels):
        if not isinstance(label, bool):
            problems.append(rec.problem(f"labels[{i}]", f"expected true or false, got {label!r}"))
            ok = False
    return StepwiseExample(d["prompt"], list(steps), list(labels), rec) if ok else None


def _load(spec: str, parse, config: str, seed: int) -> list:
    problems: list[str] = []
    out = []
    for rec in read_records(spec, config=config, seed=seed):
        result = parse(rec, problems)
        if isinstance(result, list):
            out.extend(result)
        elif result is not None:
            out.append(result)
    if problems:
        raise InputError(problems)
    return out


# Each loader takes a data value (a file, a dataset id, a mixture: rlhfkit.data.io), the
# configuration of its dataset ids and the seed of its mixture.


def load_sft(spec: str, *, config: str = "", seed: int = 0) -> list[SFTExample]:
    return _load(spec, parse_sft, config, seed)


def load_preferences(spec: str, *, config: str = "", seed: int = 0) -> list[PreferenceExample]:
    """Preference pairs; ranking records are expanded into all their pairs."""
    return _load(spec, parse_preference, config, seed)


def load_rankings(spec: str, *, config: str = "", seed: int = 0) -> list[RankingExample]:
    return _load(spec, parse_ranking, config, seed)


def load_scored(spec: str, *, config: str = "", seed: int = 0) -> list[ScoredExample]:
    """Scored completions (``reward`` None where the record has none); pairs give both sides."""
    return _load(spec, parse_scored, config, seed)


def load_unpaired(spec: str, *, config: str = "", seed: int = 0) -> list[UnpairedExample]:
    """Completions labelled desirable or not (KTO); a preference pair gives both of its sides."""
    return _load(spec, parse_unpaired, config, seed)


def load_prompts(spec: str, *, config: str = "", seed: int = 0) -> list[PromptExample]:
    return _load(spec, parse_prompt, config, seed)


def load_stepwise(spec: str, *, config: str = "", seed: int = 0) -> list[StepwiseExample]:
    return _load(spec, parse_stepwise, config, seed)
