"""The parts of ``rlhfkit judge``, each usable on its own.

* :mod:`.prompts`: judge prompt rendering (single, pairwise, chat-bench; multi-turn; references)
* :mod:`.parsing`: robust verdict parsing (``[[7]]``, ``[[A]]``, ``[[PASS]]`` and fallbacks)
* :mod:`.pairwise`: both-order judging: the two games, combining verdicts, consistency,
  win rate, Arena battles
* the judge's model comes through :mod:`rlhfkit.models.backends` (an OpenAI-compatible
  endpoint or a local model behind one interface)
* :mod:`.data`: question sets (built-in and MT-Bench format) and answer files
* :mod:`.candidates`: candidate answers generated turn by turn, saved next to the report
* :mod:`.calls`: judge calls sent in chunks, replies parsed and streamed to ``judgments.jsonl``;
  the judge's reliability counts
* :mod:`.modes`: one module per ``--mode`` behind the ``MODES`` registry, each with a typed
  summary that writes its part of ``results.json``, ``report.md`` and the plots
* :mod:`.report`: the report's header and reliability section, the bar plot the modes share
"""

from rlhfkit.evaluation.judging.pairwise import PairOutcome, combine_verdicts, summarize
from rlhfkit.evaluation.judging.parsing import Parsed, parse_pairwise, parse_pass_fail, parse_rating

__all__ = ["PairOutcome", "Parsed", "combine_verdicts", "parse_pairwise", "parse_pass_fail", "parse_rating",
           "summarize"]
