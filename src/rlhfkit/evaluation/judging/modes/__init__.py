"""The judge's modes, one module each, behind one registry (``--mode NAME`` -> ``MODES[NAME]``).

* :mod:`.single`: every answer graded 1–10
* :mod:`.pairwise`: every pair of candidates, both orders, with Bradley–Terry ratings
* :mod:`.winrate`: every candidate against a reference, raw and length-controlled win rate
* :mod:`.chat_bench`: scripted conversations, each reply pass/fail against its requirement

A new mode is a module with a :class:`~.base.JudgeMode` and its typed summary, plus an entry
here (and its name in ``judge.Mode``); nothing else switches on the mode's name.
"""

from rlhfkit.evaluation.judging.modes.base import JudgedRun, JudgeMode, Summary
from rlhfkit.evaluation.judging.modes.chat_bench import ChatBenchMode
from rlhfkit.evaluation.judging.modes.pairwise import PairwiseMode
from rlhfkit.evaluation.judging.modes.single import SingleMode
from rlhfkit.evaluation.judging.modes.winrate import WinRateMode

MODES: dict[str, JudgeMode] = {m.name: m for m in (SingleMode(), PairwiseMode(), WinRateMode(), ChatBenchMode())}

__all__ = ["MODES", "JudgeMode", "JudgedRun", "Summary"]
