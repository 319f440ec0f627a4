"""Fixtures of the recipes that sample their own completions (ppo, dpo --online): a reward file and prompts."""

from __future__ import annotations

import pytest

from core_helpers import TOY_REWARDS, write_jsonl, write_text


@pytest.fixture(scope="module")
def reward_fn(tmp_path_factory) -> str:
    """``reward.py:lower`` (``reward_fn.replace(":lower", ":upper")`` is the other reward)."""
    return write_text(tmp_path_factory.mktemp("reward") / "reward.py", TOY_REWARDS) + ":lower"


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> str:
    """16 prompts: 12 strings, 4 message lists with a system turn."""
    rows = [{"prompt": f"say something {i}"} for i in range(12)]
    rows += [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"word {i}"}]}
             for i in range(4)]
    return write_jsonl(tmp_path_factory.mktemp("prompts") / "prompts.jsonl", rows)
