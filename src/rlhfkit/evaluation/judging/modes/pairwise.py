"""``--mode pairwise``: every pair of candidates compared on every question and turn.

Each comparison is judged in both orders and the two verdicts combined
(:mod:`rlhfkit.evaluation.judging.pairwise`: disagreeing verdicts count as a tie). The summary
gives wins, losses, ties, win rate and the judge's position-consistency rate per pair and per
model, and Bradley–Terry ratings fitted to the combined verdicts (:mod:`rlhfkit.evaluation.arena`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhfkit.evaluation.judging.calls import Call
from rlhfkit.evaluation.judging.data import Answers, Question
from rlhfkit.evaluation.judging.modes.base import JudgedRun
from rlhfkit.evaluation.judging.pairwise import (
    PairOutcome,
    PairRecord,
    PairSummary,
    battles_from,
    combine_games,
    pairwise_calls,
    summarize,
)
from rlhfkit.evaluation.judging.report import desc
from rlhfkit.evaluation.report import fmt_num, fmt_pct, md_escape, md_table

if TYPE_CHECKING:
    from rlhfkit.evaluation.arena import ArenaResult

RATING_BOOTSTRAP = 200  # bootstrap rounds for the ratings' confidence intervals
_FLIP = {"win": "loss", "loss": "win"}  # an outcome seen from the other side


@dataclass
class PairResult:
    """Model A (shown as X) against model B over all their comparisons."""

    model_a: str
    model_b: str
    stats: PairSummary

    def to_dict(self) -> dict[str, Any]:
        return {"model_a": self.model_a, "model_b": self.model_b, **self.stats.to_dict()}


@dataclass
class ModelRecord:
    """One candidate against all the others."""

    wins: int
    losses: int
    ties: int
    invalid: int
    win_rate: float


@dataclass
class PairwiseSummary:
    pairs: list[PairResult]
    models: dict[str, ModelRecord]
    consistency: float      # position consistency over all comparisons (NaN: none decided)
    inconsistent: int
    invalid_pairs: int
    comparisons: int
    battles: list[dict[str, Any]] = field(default_factory=list, repr=False)
    ratings: ArenaResult | None = field(default=None, repr=False)  # None: no decided comparison

    def to_dict(self) -> dict[str, Any]:
        out = {"pairs": [p.to_dict() for p in self.pairs],
               "models": {m: asdict(v) for m, v in self.models.items()},
               "consistency": self.consistency, "inconsistent": self.inconsistent,
               "invalid_pairs": self.invalid_pairs, "comparisons": self.comparisons}
        if self.ratings is not None:
            out["ratings"] = self.ratings.rows()
        return out

    def report_lines(self) -> list[str]:
        rows = [[md_escape(p.model_a, 40), md_escape(p.model_b, 40), p.stats.wins, p.stats.losses,
                 p.stats.ties, p.stats.inconsistent, p.stats.invalid, fmt_pct(p.stats.win_rate),
                 fmt_pct(p.stats.consistency)] for p in self.pairs]
        lines = ["## Pairs", "",
                 "Wins/losses/ties of model A against model B (each comparison judged in both "
                 "orders; disagreeing verdicts count as ties and are also listed as "
                 "*inconsistent*; comparisons with a malformed verdict are *invalid* and left out).",
                 "", md_table(["model A", "model B", "wins", "losses", "ties", "inconsistent",
                               "invalid", "A's win rate", "consistency"], rows,
                              ["l", "l", "r", "r", "r", "r", "r", "r", "r"]),
                 f"Position consistency of the judge over all comparisons: "
                 f"{fmt_pct(self.consistency)}.", ""]
        rows = [[md_escape(m, 60), v.wins, v.losses, v.ties, fmt_pct(v.win_rate)]
                for m, v in sorted(self.models.items(), key=lambda kv: desc(kv[1].win_rate))]
        lines += ["## Per model (against all others)", "",
                  md_table(["model", "wins", "losses", "ties", "win rate"], rows,
                           ["l", "r", "r", "r", "r"])]
        ratings = self.ratings.rows() if self.ratings is not None else []
        if ratings:
            rrows = [[md_escape(r["model"], 60), fmt_num(r["bt"]),
                      (f"{fmt_num(r['bt_ci_low'])} – {fmt_num(r['bt_ci_high'])}"
                       if r["bt_ci_low"] is not None else "—"), r["battles"]]
                     for r in ratings]
            lines += ["## Bradley–Terry ratings from these battles", "",
                      md_table(["model", "BT", "95% CI", "battles"], rrows, ["l", "r", "c", "r"]),
                      "![ratings](ratings.png)", ""]
        return lines

    def write_plots(self, out: Path) -> None:
        if self.ratings is not None:
            from rlhfkit.evaluation.arena import plot_ratings

            plot_ratings(self.ratings, out / "ratings.png")

    def console_lines(self) -> list[str]:
        return [f"  {p.model_a} vs {p.model_b}: {p.stats.wins}-{p.stats.losses}-{p.stats.ties} "
                f"(win rate {p.stats.win_rate:.3f}, consistency {p.stats.consistency:.3f})"
                for p in self.pairs]


def summarize_pairwise(records: Sequence[PairRecord], models: Sequence[str]) -> PairwiseSummary:
    """Per pair (in the order first judged), per model against all others, and overall."""
    by_pair: dict[tuple[str, str], list[PairRecord]] = {}
    for r in records:
        by_pair.setdefault((r.x, r.y), []).append(r)
    pairs = [PairResult(x, y, summarize(r.outcome for r in rs)) for (x, y), rs in by_pair.items()]
    per_model = {}
    for m in models:
        s = summarize(r.outcome if r.x == m else _flipped(r.outcome) for r in records if m in (r.x, r.y))
        per_model[m] = ModelRecord(s.wins, s.losses, s.ties, s.invalid, s.win_rate)
    overall = summarize(r.outcome for r in records)
    return PairwiseSummary(pairs, per_model, consistency=overall.consistency,
                           inconsistent=overall.inconsistent, invalid_pairs=overall.invalid,
                           comparisons=overall.pairs)


def _flipped(o: PairOutcome) -> PairOutcome:
    """The outcome seen from Y's side."""
    return PairOutcome(_FLIP.get(o.outcome, o.outcome), o.consistent)


def all_pairs(models: Sequence[str]) -> list[tuple[str, str]]:
    """Every unordered pair, each model as X against the ones after it."""
    return [(models[i], models[j]) for i in range(len(models)) for j in range(i + 1, len(models))]


class PairwiseMode:
    name = "pairwise"
    question_set = "mt"
    needs_checks = False
    needs_reference = False
    emits_battles = True
    repeatable = False

    def candidate_problems(self, names: Sequence[str], reference_model: str) -> list[str]:
        if len(set(names)) < 2:
            return [f"--mode pairwise needs at least two candidates (got {len(set(names))})"]
        return []

    def calls(self, questions: Sequence[Question], answers: Answers, models: Sequence[str],
              reference_model: str) -> list[Call]:
        return pairwise_calls(questions, answers, all_pairs(models))

    def summarize(self, run: JudgedRun) -> PairwiseSummary:
        records = combine_games(run.judged)
        battles = battles_from(records, run.judge_name)
        ratings = None
        if battles:
            from rlhfkit.evaluation.arena import Battle, rate

            ratings = rate([Battle(b["model_a"], b["model_b"], b["winner"]) for b in battles],
                           bootstrap=RATING_BOOTSTRAP, seed=run.seed)
        return replace(summarize_pairwise(records, run.models), battles=battles, ratings=ratings)
