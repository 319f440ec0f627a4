"""``--mode winrate``: every candidate against ``--baseline`` (AlpacaEval's reference model).

Each comparison is judged in both orders as in pairwise mode; the summary gives the raw win rate
and the length-controlled win rate (:mod:`rlhfkit.evaluation.winrate`), each with a standard
error, and the average answer lengths (in characters). With two or more candidates judged against
the reference, it adds the LC win rate with AlpacaEval's instruction-difficulty term
(``length_controlled_v1``'s form), the difficulty of each (question, turn) estimated jointly from
every candidate's comparisons (:func:`~rlhfkit.evaluation.winrate.instruction_difficulty`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from rlhfkit.evaluation.judging.calls import Call, mean_or_nan
from rlhfkit.evaluation.judging.data import Answers, Question
from rlhfkit.evaluation.judging.modes.base import JudgedRun
from rlhfkit.evaluation.judging.pairwise import PairRecord, battles_from, combine_games, pairwise_calls, summarize
from rlhfkit.evaluation.judging.report import bar_plot
from rlhfkit.evaluation.report import fmt_num, fmt_pct, md_escape, md_table
from rlhfkit.evaluation.winrate import instruction_difficulty, length_controlled_win_rate, win_rate

NAN = float("nan")


@dataclass
class WinRateRecord:
    """One candidate against the reference."""

    comparisons: int
    wins: int
    losses: int
    ties: int
    invalid: int                # comparisons with a malformed verdict (excluded)
    inconsistent: int           # the two orders disagreed (counted as ties)
    win_rate: float             # ties count half
    stderr: float
    lc_win_rate: float          # predicted at zero length difference
    lc_stderr: float
    length_coef: float
    consistency: float
    avg_length: float           # characters, over the valid comparisons
    reference_avg_length: float
    lc_difficulty_win_rate: float = NAN  # with the instruction-difficulty term (>= 2 candidates; else NaN)
    lc_difficulty_stderr: float = NAN
    difficulty_coef: float = NAN         # the model's weight on the difficulty


@dataclass
class WinRateSummary:
    reference_model: str
    models: dict[str, WinRateRecord]
    battles: list[dict[str, Any]] = field(default_factory=list, repr=False)
    # {"question_id:turn": γ} estimated from every candidate (empty with one candidate), and its C
    difficulty: dict[str, float] = field(default_factory=dict)
    difficulty_c: float = NAN

    def to_dict(self) -> dict[str, Any]:
        out = {"reference_model": self.reference_model, "models": {m: asdict(v) for m, v in self.models.items()}}
        if self.difficulty:
            out["instruction_difficulty"] = {"c": self.difficulty_c, "values": self.difficulty}
        return out

    def report_lines(self) -> list[str]:
        hard = bool(self.difficulty)
        rows = [[md_escape(m, 60), fmt_pct(v.win_rate) + f" ± {fmt_pct(v.stderr)}",
                 fmt_pct(v.lc_win_rate) + f" ± {fmt_pct(v.lc_stderr)}"]
                + ([fmt_pct(v.lc_difficulty_win_rate) + f" ± {fmt_pct(v.lc_difficulty_stderr)}"] if hard else [])
                + [v.wins, v.losses, v.ties, v.invalid, fmt_pct(v.consistency),
                   fmt_num(v.avg_length, 0), fmt_num(v.reference_avg_length, 0)]
                for m, v in self.models.items()]
        heads = (["model", "win rate", "LC win rate"] + (["LC + difficulty"] if hard else [])
                 + ["wins", "losses", "ties", "invalid", "consistency", "avg length", "ref avg length"])
        note = (f" LC + difficulty adds AlpacaEval's instruction-difficulty term, the difficulty of each "
                f"question turn estimated from all {len(self.models)} candidates (C = {fmt_num(self.difficulty_c, 3)})."
                if hard else "")
        return [f"## Win rate against {md_escape(self.reference_model)}", "",
                "Raw win rate counts ties as half a win; the length-controlled (LC) win rate is "
                "the win rate predicted at zero length difference by a logistic regression of "
                "the preference on tanh(length difference / its std) (AlpacaEval 2's "
                "length_controlled_minimal GLM). ± one standard error. "
                "Lengths in characters." + note, "",
                md_table(heads, rows, ["l"] + ["r"] * (len(heads) - 1)),
                "![win rates](winrate.png)", ""]

    def write_plots(self, out: Path) -> None:
        if not self.models:
            return
        names = list(self.models)
        bar_plot(out / "winrate.png", names,
                 {"win rate": [self.models[m].win_rate for m in names],
                  "length-controlled": [self.models[m].lc_win_rate for m in names]},
                 f"vs {self.reference_model}", "Win rate against the reference", (0, 1),
                 errors={"win rate": [self.models[m].stderr for m in names],
                         "length-controlled": [self.models[m].lc_stderr for m in names]})

    def console_lines(self) -> list[str]:
        return [f"  {m} vs {self.reference_model}: win rate {v.win_rate:.3f}, LC {v.lc_win_rate:.3f}"
                + (f", LC + difficulty {v.lc_difficulty_win_rate:.3f}" if self.difficulty else "")
                for m, v in self.models.items()]


def _answer_length(answers: Answers, model: str, r: PairRecord) -> int:
    return len(answers[model][str(r.question_id)][r.turn - 1])


def _against_reference(mine: Sequence[PairRecord], answers: Answers, model: str, reference: str,
                       difficulty: dict[str, float]) -> WinRateRecord:
    """``model``'s comparisons with the reference (X = model, Y = reference)."""
    valid = [r for r in mine if r.outcome.preference is not None]
    prefs = [r.outcome.preference for r in valid]
    len_m = [_answer_length(answers, model, r) for r in valid]
    len_r = [_answer_length(answers, reference, r) for r in valid]
    raw = win_rate(prefs)
    lc = length_controlled_win_rate(prefs, len_m, len_r)
    hard = (length_controlled_win_rate(prefs, len_m, len_r, difficulty=[difficulty[_key(r)] for r in valid])
            if difficulty else None)
    stats = summarize(r.outcome for r in mine)
    return WinRateRecord(comparisons=len(mine), wins=raw.wins, losses=raw.losses, ties=raw.ties,
                         invalid=stats.invalid, inconsistent=stats.inconsistent,
                         win_rate=raw.win_rate, stderr=raw.stderr,
                         lc_win_rate=lc.lc_win_rate, lc_stderr=lc.stderr, length_coef=lc.length_coef,
                         consistency=stats.consistency, avg_length=mean_or_nan(len_m),
                         reference_avg_length=mean_or_nan(len_r),
                         lc_difficulty_win_rate=hard.lc_win_rate if hard else NAN,
                         lc_difficulty_stderr=hard.stderr if hard else NAN,
                         difficulty_coef=hard.difficulty_coef if hard else NAN)


def _key(r: PairRecord) -> str:
    """The instruction a comparison is about: one turn of one question."""
    return f"{r.question_id}:{r.turn}"


def _difficulty(records: Sequence[PairRecord], answers: Answers, reference: str) -> tuple[dict[str, float], float]:
    """Each instruction's γ from every candidate's valid comparisons; empty with fewer than two candidates."""
    valid = [r for r in records if r.outcome.preference is not None]
    if len({r.x for r in valid}) < 2:
        return {}, NAN
    return instruction_difficulty([r.outcome.preference for r in valid], [r.x for r in valid],
                                  [_key(r) for r in valid], [_answer_length(answers, r.x, r) for r in valid],
                                  [_answer_length(answers, reference, r) for r in valid])


def summarize_winrate(records: Sequence[PairRecord], answers: Answers, reference: str,
                      models: Sequence[str]) -> WinRateSummary:
    mine = {m: [r for r in records if r.x == m and r.y == reference] for m in models if m != reference}
    difficulty, c = _difficulty([r for rs in mine.values() for r in rs], answers, reference)
    return WinRateSummary(reference, {m: _against_reference(rs, answers, m, reference, difficulty)
                                      for m, rs in mine.items()}, difficulty=difficulty, difficulty_c=c)


class WinRateMode:
    name = "winrate"
    question_set = "mt"
    needs_checks = False
    needs_reference = True
    emits_battles = True
    repeatable = False

    def candidate_problems(self, names: Sequence[str], reference_model: str) -> list[str]:
        if reference_model not in names:
            return [f"--baseline {reference_model!r} is not among the candidates ({', '.join(names)})"]
        if len(set(names)) < 2:
            return ["--mode winrate needs at least one candidate besides the reference"]
        return []

    def calls(self, questions: Sequence[Question], answers: Answers, models: Sequence[str],
              reference_model: str) -> list[Call]:
        return pairwise_calls(questions, answers, [(m, reference_model) for m in models if m != reference_model])

    def summarize(self, run: JudgedRun) -> WinRateSummary:
        records = combine_games(run.judged)
        return replace(summarize_winrate(records, run.answers, run.reference_model, run.models),
                       battles=battles_from(records, run.judge_name))
