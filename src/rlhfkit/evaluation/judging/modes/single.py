"""``--mode single``: every answer graded 1–10 in MT-Bench's manner.

The judge explains, then writes ``[[rating]]``; turn 2 of a two-turn question is graded in the
context of turn 1; a question with a reference answer (math, reasoning) is graded against it.

Each mean carries its standard error over questions; with ``--repeats R`` every answer is graded
R times at the judge's temperature, an answer's score is the mean of its valid grades, and the
summary adds the judge's own spread (:mod:`rlhfkit.evaluation.judging.spread`).
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
from rlhfkit.evaluation.judging.spread import judge_spread, stderr_over_questions
from rlhfkit.evaluation.report import fmt_num, md_escape, md_table

NAN = float("nan")
SPREAD_NOTE = ("SE (questions): standard error of the mean over questions (a question's turns are one "
               "cluster). With --repeats: judge sd is the mean over answers of the standard deviation of its "
               "repeated grades; SE (judge) the standard error of the mean that comes from the judge alone.")


@dataclass
class ModelGrades:
    score: float                    # mean over graded answers (turns) of each one's mean rating (NaN: none)
    graded: int                     # valid ratings (with --repeats, every repeat counts)
    malformed: int                  # ratings that could not be read (excluded)
    turns: dict[str, float]         # turn number -> mean rating
    categories: dict[str, float]    # question category -> mean rating
    stderr: float = NAN             # standard error of `score` over questions (spread.stderr_over_questions)
    questions: int = 0              # questions with at least one graded turn
    repeats: int = 1                # grades asked per answer (--repeats)
    judge_sd: float = NAN           # mean per-answer standard deviation of the repeats (spread.judge_spread)
    judge_stderr: float = NAN       # standard error of `score` from the judge alone


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
        repeated = any(v.repeats > 1 for v in self.models.values())
        spread_heads = ["SE (questions)"] + (["judge sd", "SE (judge)"] if repeated else [])
        rows = []
        for m in sorted(models, key=lambda m: desc(self.models[m].score)):
            v = self.models[m]
            rows.append([md_escape(m, 60), fmt_num(v.score, 2)]
                        + [fmt_num(v.turns.get(t), 2) for t in turn_keys]
                        + [v.graded, v.malformed, fmt_num(v.stderr, 2)]
                        + ([fmt_num(v.judge_sd, 2), fmt_num(v.judge_stderr, 2)] if repeated else []))
        heads = ["model", "mean"] + [f"turn {t}" for t in turn_keys] + ["graded", "malformed"] + spread_heads
        lines = ["## Scores (1–10)", "",
                 md_table(heads, rows, ["l"] + ["r"] * (len(heads) - 1)), SPREAD_NOTE, ""]
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
        def judge(v: ModelGrades) -> str:
            return (f"; judge sd {v.judge_sd:.2f}, judge SE {v.judge_stderr:.2f} over {v.repeats} repeats"
                    if v.repeats > 1 else "")
        return [f"  {m}: {v.score:.2f} / 10 ± {v.stderr:.2f} ({v.graded} graded, {v.malformed} malformed{judge(v)})"
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


def _model_grades(mine: Sequence[Judged], repeats: int) -> ModelGrades:
    """One candidate's ratings; the repeats of one (question, turn) are averaged first."""
    grades: dict[tuple[str, int], list[float]] = defaultdict(list)
    category: dict[tuple[str, int], str] = {}
    for j in mine:
        answer = (str(j.call.meta["question_id"]), j.call.meta["turn"])
        category[answer] = j.call.meta["category"]
        if j.parsed.ok:
            grades[answer].append(j.parsed.value)
    means = {a: sum(g) / len(g) for a, g in grades.items()}
    turns: dict[int, list[float]] = defaultdict(list)
    cats: dict[str, list[float]] = defaultdict(list)
    for (q, t), s in means.items():
        turns[t].append(s)
        cats[category[(q, t)]].append(s)
    graded = sum(len(g) for g in grades.values())
    spread = judge_spread(list(grades.values()))
    return ModelGrades(score=mean_or_nan(list(means.values())), graded=graded, malformed=len(mine) - graded,
                       turns={str(t): mean_or_nan(v) for t, v in sorted(turns.items())},
                       categories={c: mean_or_nan(v) for c, v in sorted(cats.items())},
                       stderr=stderr_over_questions(list(means.values()), [q for q, _ in means]),
                       questions=len({q for q, _ in means}), repeats=repeats,
                       judge_sd=spread.mean_sd if repeats > 1 else NAN,
                       judge_stderr=spread.stderr if repeats > 1 else NAN)


def summarize_single(judged: Sequence[Judged], models: Sequence[str], repeats: int = 1) -> SingleSummary:
    per_question: dict[str, dict[str, dict[int, list[float | None]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list)))
    for j in judged:
        per_question[str(j.call.meta["question_id"])][j.call.meta["model"]][j.call.meta["turn"]].append(j.parsed.value)
    return SingleSummary({m: _model_grades([j for j in judged if j.call.meta["model"] == m], repeats) for m in models},
                         {q: {m: {str(t): _mean_valid(v) for t, v in d_m.items()} for m, d_m in d.items()}
                          for q, d in per_question.items()})


def _mean_valid(grades: Sequence[float | None]) -> float | None:
    """The mean of an answer's readable grades; None when every repeat was malformed."""
    valid = [g for g in grades if g is not None]
    return sum(valid) / len(valid) if valid else None


class SingleMode:
    name = "single"
    question_set = "mt"
    needs_checks = False
    needs_reference = False
    emits_battles = False
    repeatable = True

    def candidate_problems(self, names: Sequence[str], reference_model: str) -> list[str]:
        return []

    def calls(self, questions: Sequence[Question], answers: Answers, models: Sequence[str],
              reference_model: str) -> list[Call]:
        return single_calls(questions, answers, models)

    def summarize(self, run: JudgedRun) -> SingleSummary:
        return summarize_single(run.judged, run.models, run.repeats)
