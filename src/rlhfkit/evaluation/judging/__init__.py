"""The parts of ``rlhfkit judge``, each usable on its own.

* :mod:`.prompts`: judge prompt rendering (single, pairwise, chat-bench; multi-turn; references)
* :mod:`.parsing`: robust verdict parsing (``[[7]]``, ``[[A]]``, ``[[PASS]]`` and fallbacks)
* :mod:`.pairwise`: both-order judging: combining verdicts, consistency, win rate
* :mod:`.backends`: the ``complete(chats, temperature, max_tokens)`` interface; an
  OpenAI-compatible endpoint and a local model
* :mod:`.data`: question sets (built-in and MT-Bench format) and answer files
"""

from rlhfkit.evaluation.judging.backends import BackendError, JudgeBackend, LocalBackend, OpenAIChatBackend
from rlhfkit.evaluation.judging.pairwise import PairOutcome, combine_verdicts, summarize
from rlhfkit.evaluation.judging.parsing import Parsed, parse_pairwise, parse_pass_fail, parse_rating

__all__ = ["BackendError", "JudgeBackend", "LocalBackend", "OpenAIChatBackend", "PairOutcome",
           "Parsed", "combine_verdicts", "parse_pairwise", "parse_pass_fail", "parse_rating",
           "summarize"]
