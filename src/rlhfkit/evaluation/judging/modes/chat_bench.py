"""``--mode chat-bench``: scripted multi-turn conversations, each reply graded pass/fail.

The candidate answers a script turn by turn; the judge decides ``[[PASS]]`` or ``[[FAIL]]`` for
each reply against that turn's requirement (the script's ``checks``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

from rlhfkit.evaluation.judging.calls import Call, Judged, available_turns, mean_or_nan
from rlhfkit.evaluation.judging.data import Answers, Question
from rlhfkit.evaluation.judging.modes.base import JudgedRun
from rlhfkit.evaluation.judging.prompts import chatbench_messages
from rlhfkit.evaluation.judging.report import bar_plot
from rlhfkit.evaluation.report import fmt_pct, md_escape, md_table

MARKS = {"PASS": "✓", "FAIL": "✗"}  # in the report's grid; "?" for a malformed verdict


@dataclass
class ModelPassRate:
    pass_rate: float                    # passed / graded (NaN: none graded)
    passed: int
    graded: int                         # replies with a readable verdict
    malformed: int
    conversations_fully_passed: int     # every turn of the script passed
    conversations_graded: int           # scripts with every turn answered and readably judged
    turns: dict[str, float]             # turn number -> pass rate
    categories: dict[str, float]        # category -> pass rate
    per_conversation: dict[str, list[str | None]]  # script id -> verdict per turn (None: malformed)


@dataclass
class ChatBenchSummary:
    models: dict[str, ModelPassRate]
    battles: ClassVar[tuple] = ()   # grades, not comparisons

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def report_lines(self) -> list[str]:
        rows = [[md_escape(m, 60), fmt_pct(v.pass_rate), f"{v.passed}/{v.graded}",
                 f"{v.conversations_fully_passed}/{v.conversations_graded}", v.malformed]
                for m, v in self.models.items()]
        lines = ["## Pass rates", "",
                 md_table(["model", "turns passed", "count", "conversations fully passed",
                           "malformed"], rows, ["l", "r", "r", "r", "r"])]
        models = list(self.models)
        convs = sorted({k for v in self.models.values() for k in v.per_conversation})
        crow = []
        for k in convs:
            cells = [md_escape(k)]
            for m in models:
                verdicts = self.models[m].per_conversation.get(k)
                cells.append(" ".join(MARKS.get(v, "?") for v in verdicts) if verdicts else "—")
            crow.append(cells)
        lines += ["## Per conversation", "", "One mark per turn: ✓ pass, ✗ fail, ? malformed.", "",
                  md_table(["script"] + [md_escape(m, 30) for m in models], crow),
                  "![pass rates](chat_bench.png)", ""]
        return lines

    def write_plots(self, out: Path) -> None:
        cats = sorted({c for v in self.models.values() for c in v.categories})
        bar_plot(out / "chat_bench.png", cats + ["overall"],
                 {m: [v.categories.get(c) for c in cats] + [v.pass_rate] for m, v in self.models.items()},
                 "pass rate", "Chat-bench", (0, 1))

    def console_lines(self) -> list[str]:
        return [f"  {m}: pass rate {v.pass_rate:.3f} ({v.passed}/{v.graded})" for m, v in self.models.items()]


def chatbench_calls(questions: Sequence[Question], answers: Answers, models: Sequence[str]) -> list[Call]:
    calls = []
    for q in questions:
        for m in models:
            replies = answers[m].get(q.key, [])
            for t in range(1, available_turns(answers[m], q) + 1):
                calls.append(Call("chat-bench", {"question_id": q.question_id,
                                                 "category": q.category, "turn": t, "model": m},
                                  chatbench_messages(q.turns, replies, t, q.checks[t - 1],
                                                     q.system)))
    return calls


def _model_pass_rate(mine: Sequence[Judged], turns_of: dict[str, int]) -> ModelPassRate:
    """One candidate's verdicts; ``turns_of`` gives each script's number of turns."""
    valid = [j for j in mine if j.parsed.ok]
    cats: dict[str, list[float]] = defaultdict(list)
    turns: dict[int, list[float]] = defaultdict(list)
    convs: dict[str, list[Judged]] = defaultdict(list)
    for j in mine:
        convs[str(j.call.meta["question_id"])].append(j)
        if j.parsed.ok:
            ok = float(j.parsed.value == "PASS")
            cats[j.call.meta["category"]].append(ok)
            turns[j.call.meta["turn"]].append(ok)
    complete = {k: v for k, v in convs.items()
                if all(j.parsed.ok for j in v) and len(v) == turns_of[k]}
    passed = sum(all(j.parsed.value == "PASS" for j in v) for v in complete.values())
    return ModelPassRate(
        pass_rate=mean_or_nan([float(j.parsed.value == "PASS") for j in valid]),
        passed=sum(j.parsed.value == "PASS" for j in valid), graded=len(valid),
        malformed=len(mine) - len(valid),
        conversations_fully_passed=passed, conversations_graded=len(complete),
        turns={str(t): mean_or_nan(v) for t, v in sorted(turns.items())},
        categories={c: mean_or_nan(v) for c, v in sorted(cats.items())},
        per_conversation={k: [j.parsed.value for j in sorted(v, key=lambda j: j.call.meta["turn"])]
                          for k, v in convs.items()})


def summarize_chatbench(judged: Sequence[Judged], models: Sequence[str],
                        questions: Sequence[Question]) -> ChatBenchSummary:
    turns_of = {q.key: len(q.turns) for q in questions}
    return ChatBenchSummary({m: _model_pass_rate([j for j in judged if j.call.meta["model"] == m], turns_of)
                             for m in models})


class ChatBenchMode:
    name = "chat-bench"
    question_set = "chat-bench"
    needs_checks = True
    needs_reference = False
    emits_battles = False
    repeatable = False

    def candidate_problems(self, names: Sequence[str], reference_model: str) -> list[str]:
        return []

    def calls(self, questions: Sequence[Question], answers: Answers, models: Sequence[str],
              reference_model: str) -> list[Call]:
        return chatbench_calls(questions, answers, models)

    def summarize(self, run: JudgedRun) -> ChatBenchSummary:
        return summarize_chatbench(run.judged, run.models, run.questions)
