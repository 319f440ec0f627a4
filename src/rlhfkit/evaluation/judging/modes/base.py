"""What a judge mode is: the calls it makes, and a typed summary that renders itself.

``rlhfkit judge`` asks the mode, in order: :meth:`JudgeMode.candidate_problems` (before any
model is loaded), :meth:`JudgeMode.calls` (what to ask the judge), :meth:`JudgeMode.summarize`
(the judged calls as a typed :class:`Summary`); then the summary gives ``results.json``'s
``summary`` (:meth:`Summary.to_dict`), its sections of ``report.md``, its plots and the lines
printed at the end. Nothing outside the mode's module knows what its summary holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from rlhfkit.evaluation.judging.calls import Call, Judged
from rlhfkit.evaluation.judging.data import Answers, Question


@dataclass(frozen=True)
class JudgedRun:
    """Everything a mode summarises: the questions, the candidates' answers, the judge's verdicts."""

    questions: list[Question]
    answers: Answers
    models: list[str]           # candidates, in the order given
    judged: list[Judged]        # every call with the judge's reply, in the order asked
    judge_name: str
    reference_model: str = ""   # winrate: the candidate every other one is compared with
    seed: int = 0               # pairwise: the bootstrap of the Bradley–Terry ratings
    repeats: int = 1            # grades asked per answer (--repeats; modes with ``repeatable``)


class Summary(Protocol):
    # The combined verdicts as Chatbot Arena battles (``--emit-battles``); empty for grading modes.
    battles: Sequence[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        """``results.json``'s ``summary``: plain JSON values (NaN where nothing was measured)."""

    def report_lines(self) -> list[str]:
        """The mode's sections of ``report.md`` (markdown lines)."""

    def write_plots(self, out: Path) -> None:
        """The mode's PNGs in the output directory."""

    def console_lines(self) -> list[str]:
        """One line per model (or pair) printed when the command ends."""


class JudgeMode(Protocol):
    name: str               # the --mode value
    question_set: str       # the built-in set `--questions builtin` means in this mode
    needs_checks: bool      # questions must carry a requirement per turn (chat-bench scripts)
    needs_reference: bool   # needs --baseline (the reference candidate)
    emits_battles: bool     # its verdicts are comparisons (--emit-battles allowed)
    repeatable: bool        # each call may be sent --repeats times and the verdicts summarised together

    def candidate_problems(self, names: Sequence[str], reference_model: str) -> list[str]:
        """What is wrong with these candidate names for this mode (empty: nothing)."""

    def calls(self, questions: Sequence[Question], answers: Answers, models: Sequence[str],
              reference_model: str) -> list[Call]:
        """The judge calls, in the order they are sent."""

    def summarize(self, run: JudgedRun) -> Summary:
        """The judged calls as the mode's typed summary."""
