"""``--mode single``: every answer graded 1–10 in MT-Bench's manner.

The judge explains, then writes ``[[rating]]``; turn 2 of a two-turn question is graded in the
context of turn 1; a question with a reference answer (math, reasoning) is graded against it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

from rlhfkit.evaluation.judging.calls import Call, Judged, available_turns, has_reference, mean_or_nan
from rlhfkit.evaluation.judging.data import Answers, Question
from rlhfkit.evaluation.judging.modes.base import JudgedRun
from rlhfkit.evaluation.judging.prompts import single_grading_messages
from rlhfkit.evaluation.judging.report import bar_plot, desc
from rlhfkit.evaluation.report import fmt_num, md_escape, md_table


@dataclass
class ModelGrades:
    score: float                    # mean of the valid ratings (NaN: none)
    graded: int                     # valid ratings
    malformed: int                  # ratings that could not be read (excluded)
    turns: dict[str, float]         # turn number -> mean rating
    categories: dict[str, float]    # question category -> mean rating


@dataclass
class SingleSummary:
    models: dict[str, ModelGrades]
    # question id -> model -> turn number -> rating (None: malformed verdict)
    per_question: dict[str, dict[str, dict[str, float | None]]]
    battles: ClassVar[tuple] = ()   # grades, not comparisons

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def report_lines(self) -> list[str]:
        models = list(self.models)
        turn_keys = sorted({t for v in self.models.values() for t in v.turns}, key=int)
        rows = []
        for m in sorted(models, key=lambda m: desc(self.models[m].score)):
            v = self.models[m]
            rows.append([md_escape(m, 60), fmt_num(v.score, 2)]
                        + [fmt_num(v.turns.get(t), 2) for t in turn_keys]
                        + [v.graded, v.malformed])
        lines = ["## Scores (1–10)", "",
                 md_table(["model", "mean"] + [f"turn {t}" for t in turn_keys] + ["graded", "malformed"],
                          rows, ["l", "r"] + ["r"] * len(turn_keys) + ["r", "r"])]
        cats = self._categories()
        lines += ["## By category", "",
                  md_table(["category"] + [md_escape(m, 30) for m in models],
                           [[md_escape(c)] + [fmt_num(self.models[m].categories.get(c), 2)
                                              for m in models] for c in cats],
                           ["l"] + ["r"] * len(models)),
                  "![scores by category](scores.png)", ""]
        qrows = []
        for qid, d in self.per_question.items():
            cells = [md_escape(qid)]
            for m in models:
                per_turn = d.get(m, {})
                cells.append(" / ".join(fmt_num(per_turn.get(t), 1, "×" if t in per_turn else "—")
                                        for t in sorted(per_turn, key=int)) or "—")
            qrows.append(cells)
        lines += ["## Per question", "", "Scores per turn (× = malformed verdict, — = no answer).",
                  "", md_table(["question"] + [md_escape(m, 30) for m in models], qrows), ""]
        return lines

    def write_plots(self, out: Path) -> None:
        cats = self._categories()
        bar_plot(out / "scores.png", cats + ["overall"],
                 {m: [v.categories.get(c) for c in cats] + [v.score] for m, v in self.models.items()},
                 "mean score (1–10)", "Judge scores", (0, 10))

    def console_lines(self) -> list[str]:
        return [f"  {m}: {v.score:.2f} / 10 ({v.graded} graded, {v.malformed} malformed)"
                for m, v in self.models.items()]

    def _categories(self) -> list[str]:
        return sorted({c for v in self.models.values() for c in v.categories})


def single_calls(questions: Sequence[Question], answers: Answers, models: Sequence[str]) -> list[Call]:
    calls = []
    for q in questions:
        for m in models:
            replies = answers[m].get(q.key, [])
            for t in range(1, available_turns(answers[m], q) + 1):
                calls.append(Call("single", {"question_id": q.question_id, "category": q.category,
                                             "turn": t, "model": m,
                                             "reference_guided": has_reference(q, t)},
                                  single_grading_messages(q.turns, replies, t, q.reference)))
    return calls


def summarize_single(judged: Sequence[Judged], models: Sequence[str]) -> SingleSummary:
    per_model: dict[str, ModelGrades] = {}
    per_question: dict[str, dict[str, dict[int, float | None]]] = defaultdict(lambda: defaultdict(dict))
    for m in models:
        mine = [j for j in judged if j.call.meta["model"] == m]
        scores = [j.parsed.value for j in mine if j.parsed.ok]
        turns: dict[int, list[float]] = defaultdict(list)
        cats: dict[str, list[float]] = defaultdict(list)
        for j in mine:
            per_question[str(j.call.meta["question_id"])][m][j.call.meta["turn"]] = j.parsed.value
            if j.parsed.ok:
                turns[j.call.meta["turn"]].append(j.parsed.value)
                cats[j.call.meta["category"]].append(j.parsed.value)
        per_model[m] = ModelGrades(score=mean_or_nan(scores), graded=len(scores),
                                   malformed=len(mine) - len(scores),
                                   turns={str(t): mean_or_nan(v) for t, v in sorted(turns.items())},
                                   categories={c: mean_or_nan(v) for c, v in sorted(cats.items())})
    return SingleSummary(per_model, {q: {m: {str(t): s for t, s in v.items()} for m, v in d.items()}
                                     for q, d in per_question.items()})


class SingleMode:
    name = "single"
    question_set = "mt"
    needs_checks = False
    needs_reference = False
    emits_battles = False

    def candidate_problems(self, names: Sequence[str], reference_model: str) -> list[str]:
        return []

    def calls(self, questions: Sequence[Question], answers: Answers, models: Sequence[str],
              reference_model: str) -> list[Call]:
        return single_calls(questions, answers, models)

    def summarize(self, run: JudgedRun) -> SingleSummary:
        return summarize_single(run.judged, run.models)
