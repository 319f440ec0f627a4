"""``rlhfkit judge``: LLM-as-judge grading, pairwise comparison, win rates and chat-bench.

Modes (``--mode``):

* ``single``: each answer graded 1–10 in MT-Bench's manner (the judge explains, then writes
  ``[[rating]]``); turn 2 of a two-turn question is graded in the context of turn 1; a
  question with a reference answer (math, reasoning) is graded against it.
* ``pairwise``: every pair of candidates compared on every question and turn, judged in both
  orders; disagreeing verdicts count as a tie; wins, losses, ties, win rate and the judge's
  position-consistency rate per pair, plus Bradley–Terry ratings over the judged battles.
* ``winrate``: every candidate against ``--reference-model`` (AlpacaEval style): raw win rate
  and length-controlled win rate (:mod:`rlhfkit.evaluation.winrate`).
* ``chat-bench``: scripted multi-turn conversations; each reply graded ``[[PASS]]``/``[[FAIL]]``
  against that turn's requirement.

Candidates come from answer files (``--answers``, MT-Bench's model_answer format or simpler
shapes, see :mod:`rlhfkit.evaluation.judging.data`), from local models (``--model``), or from
an OpenAI-compatible endpoint (``--model-url`` with ``--model-name``). The judge is an
endpoint (``--judge-url`` and ``--judge-model``; key from ``--judge-api-key-env``) or a local
model (``--judge-model``, default ``smollm2-135m``).

Outputs in ``--output``: ``results.json``, ``report.md``, ``judgments.jsonl`` (every raw judge
reply with its prompt and parsed verdict), ``config.yaml``, ``answers/MODEL.jsonl`` for
generated answers, a PNG per mode, and with ``--emit-battles FILE`` the pairwise verdicts as
Chatbot Arena battles for ``rlhfkit arena``.
"""

from __future__ import annotations

import os
import re
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from rlhfkit.config import arg, save_config
from rlhfkit.errors import InputError
from rlhfkit.evaluation.judging.backends import BackendError, JudgeBackend, LocalBackend, OpenAIChatBackend, redact_url
from rlhfkit.evaluation.judging.data import Question, answer_records, builtin_path, load_answers, load_questions
from rlhfkit.evaluation.judging.pairwise import PairOutcome, battle_winner, combine_verdicts, summarize
from rlhfkit.evaluation.judging.parsing import Parsed, parse_pairwise, parse_pass_fail, parse_rating
from rlhfkit.evaluation.judging.prompts import (
    answer_messages,
    chatbench_messages,
    pairwise_messages,
    single_grading_messages,
)
from rlhfkit.evaluation.report import (
    JsonlWriter,
    fmt_num,
    fmt_pct,
    md_code_block,
    md_escape,
    md_table,
    new_figure,
    save_figure,
    write_json,
    write_jsonl,
    write_text,
)
from rlhfkit.evaluation.winrate import length_controlled_win_rate, win_rate

Mode = Literal["single", "pairwise", "winrate", "chat-bench"]
DEFAULT_LOCAL_JUDGE = "smollm2-135m"
CHUNK = 32  # judge calls per backend request batch (and per progress line)


@dataclass
class Config:
    """Judge candidate answers with an LLM: single grading, pairwise, win rate, chat-bench."""

    output: str = arg("", "Output directory: results.json, report.md, judgments.jsonl, plots.")
    mode: Mode = arg("single", "single: 1-10 grades; pairwise: all pairs, both orders; winrate: "
                     "each candidate vs --reference-model with a length-controlled win rate; "
                     "chat-bench: scripted conversations graded pass/fail per turn.")
    questions: str = arg("builtin", "Question file in MT-Bench's question.jsonl format, or "
                         "`builtin` (the 20 two-turn questions; the chat-bench scripts in "
                         "chat-bench mode), or `builtin:mt` / `builtin:chat-bench`.")
    categories: list[str] = arg(help="Only questions in these categories.", default_factory=list)
    limit: int = arg(0, "Use only the first N questions (0: all).")
    answers: list[str] = arg(help="Candidate answer files (JSONL; MT-Bench model_answer format, "
                             "or {question_id, model, turns|answer|completions}).",
                             default_factory=list)
    model: list[str] = arg(help="Local candidate models (paths, hub ids or embedded names) "
                           "to generate answers with.", default_factory=list)
    model_url: str = arg("", "OpenAI-compatible endpoint that generates candidate answers "
                         "(e.g. http://127.0.0.1:8000/v1 from `rlhfkit serve`).")
    model_name: list[str] = arg(help="Model names to request from --model-url (one candidate "
                                "each).", default_factory=list)
    model_api_key_env: str = arg("OPENAI_API_KEY", "Environment variable holding the API key "
                                 "for --model-url (unset: no key sent).")
    reference_model: str = arg("", "winrate mode: the candidate everyone is compared against.")
    reference_answers: str = arg("", "Reference answers for reference-guided grading, in the "
                                 "answer-file format (used where a question has no `reference`).")
    max_new_tokens: int = arg(512, "Maximum tokens per generated candidate answer.")
    temperature: float = arg(0.0, "Sampling temperature for candidate answers (0: greedy).")
    judge_url: str = arg("", "OpenAI-compatible judge endpoint (e.g. https://api.openai.com/v1); "
                         "empty: a local judge model.")
    judge_model: str = arg("", "Judge model: the name sent to --judge-url (required with it), or a "
                           f"local path/hub id/embedded name (default {DEFAULT_LOCAL_JUDGE}).")
    judge_api_key_env: str = arg("OPENAI_API_KEY", "Environment variable holding the judge's API "
                                 "key (unset: no key sent).")
    judge_max_tokens: int = arg(512, "Maximum tokens of each judgment.")
    judge_temperature: float = arg(0.0, "Judge sampling temperature (0: greedy/deterministic).")
    concurrency: int = arg(4, "Concurrent requests per endpoint.")
    request_timeout: float = arg(120.0, "Seconds to wait for one endpoint request.")
    batch_size: int = arg(4, "Batch size for local models (candidates and judge).")
    dtype: Literal["float32", "bfloat16"] = arg("float32", "Parameter dtype for local models.")
    seed: int = arg(0, "Random seed (sampling, bootstrap of the pairwise ratings).")
    emit_battles: str = arg("", "pairwise/winrate: also write the combined verdicts as Chatbot "
                            "Arena battles (JSONL, or a JSON list if the name ends in .json) for "
                            "`rlhfkit arena`.")

    def validate(self) -> list[str]:
        problems = []
        if not self.output:
            problems.append("--output is required")
        if not (self.answers or self.model or self.model_name):
            problems.append("no candidates: give --answers, --model, or --model-url with "
                            "--model-name")
        if self.model_url and not self.model_name:
            problems.append("--model-url needs --model-name (the model names to request)")
        if self.model_name and not self.model_url:
            problems.append("--model-name needs --model-url")
        if self.judge_url and not self.judge_model:
            problems.append("--judge-url needs --judge-model (the model name to request)")
        if self.mode == "winrate" and not self.reference_model:
            problems.append("--mode winrate needs --reference-model")
        if self.emit_battles and self.mode not in ("pairwise", "winrate"):
            problems.append("--emit-battles needs --mode pairwise or winrate")
        for name in ("limit",):
            if getattr(self, name) < 0:
                problems.append(f"--{name} must be >= 0")
        for name in ("max_new_tokens", "judge_max_tokens", "concurrency", "batch_size"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be >= 1")
        for name in ("temperature", "judge_temperature"):
            if getattr(self, name) < 0:
                problems.append(f"--{name.replace('_', '-')} must be >= 0")
        if self.request_timeout <= 0:
            problems.append("--request-timeout must be > 0")
        for path in self.answers:
            if not Path(path).is_file():
                problems.append(f"--answers: no such file: {path}")
        if self.reference_answers and not Path(self.reference_answers).is_file():
            problems.append(f"--reference-answers: no such file: {self.reference_answers}")
        if not self.questions.startswith("builtin") and not Path(self.questions).is_file():
            problems.append(f"--questions: no such file: {self.questions}")
        return problems


# --------------------------------------------------------------------------------------------
# Judge calls
# --------------------------------------------------------------------------------------------

PARSERS: dict[str, Callable[[str], Parsed]] = {
    "single": parse_rating, "pairwise": parse_pairwise, "chat-bench": parse_pass_fail}


@dataclass
class Call:
    """One request to the judge: what kind of verdict, about what, and the prompt."""

    kind: str                   # "single" | "pairwise" | "chat-bench"
    meta: dict[str, Any]        # question_id, category, turn, model(s), game
    messages: list[dict[str, str]]


@dataclass
class Judged:
    call: Call
    text: str
    parsed: Parsed


def execute(judge: JudgeBackend, calls: Sequence[Call], temperature: float = 0.0,
            max_tokens: int = 512, sink: JsonlWriter | None = None,
            log: Callable[[str], None] | None = None) -> list[Judged]:
    """Send the calls to the judge in chunks, parse every reply, stream raw records to ``sink``.

    A malformed verdict is kept (``parsed.value is None``) and never raises.
    """
    judge_name = getattr(judge, "name", type(judge).__name__)
    results: list[Judged] = []
    for start in range(0, len(calls), CHUNK):
        chunk = list(calls[start:start + CHUNK])
        texts = judge.complete([c.messages for c in chunk], temperature=temperature,
                               max_tokens=max_tokens)
        if len(texts) != len(chunk):
            raise BackendError(f"judge {judge_name!r} returned {len(texts)} replies for "
                               f"{len(chunk)} prompts")
        for call, text in zip(chunk, texts):
            text = text if isinstance(text, str) else ""
            parsed = PARSERS[call.kind](text)
            results.append(Judged(call, text, parsed))
            if sink is not None:
                sink.write({"kind": call.kind, **call.meta, "judge": judge_name,
                            "verdict": parsed.value, "parse": parsed.pattern,
                            "problem": parsed.problem, "judgment": text,
                            "messages": call.messages})
        if log:
            log(f"judged {len(results)}/{len(calls)}")
    return results


def available_turns(replies: dict[str, list[str]], q: Question) -> int:
    """How many of ``q``'s turns a candidate answered (0 when it has no answer)."""
    return min(len(replies.get(q.key, [])), len(q.turns))


def single_calls(questions: Sequence[Question], answers: dict[str, dict[str, list[str]]],
                 models: Sequence[str]) -> list[Call]:
    calls = []
    for q in questions:
        for m in models:
            replies = answers[m].get(q.key, [])
            for t in range(1, available_turns(answers[m], q) + 1):
                calls.append(Call("single", {"question_id": q.question_id, "category": q.category,
                                             "turn": t, "model": m,
                                             "reference_guided": _has_ref(q, t)},
                                  single_grading_messages(q.turns, replies, t, q.reference)))
    return calls


def _has_ref(q: Question, turn: int) -> bool:
    return bool(q.reference) and turn - 1 < len(q.reference) and bool(q.reference[turn - 1])


def pairwise_calls(questions: Sequence[Question], answers: dict[str, dict[str, list[str]]],
                   pairs: Sequence[tuple[str, str]]) -> list[Call]:
    """Two calls per (pair, question, turn): game 1 shows X as A, game 2 shows X as B."""
    calls = []
    for x, y in pairs:
        for q in questions:
            n = min(available_turns(answers[x], q), available_turns(answers[y], q))
            ax, ay = answers[x].get(q.key, []), answers[y].get(q.key, [])
            for t in range(1, n + 1):
                base = {"question_id": q.question_id, "category": q.category, "turn": t,
                        "model_x": x, "model_y": y, "reference_guided": _has_ref(q, t)}
                calls.append(Call("pairwise", {**base, "game": 1, "model_a": x, "model_b": y},
                                  pairwise_messages(q.turns, ax, ay, t, q.reference)))
                calls.append(Call("pairwise", {**base, "game": 2, "model_a": y, "model_b": x},
                                  pairwise_messages(q.turns, ay, ax, t, q.reference)))
    return calls


def chatbench_calls(questions: Sequence[Question], answers: dict[str, dict[str, list[str]]],
                    models: Sequence[str]) -> list[Call]:
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


@dataclass
class PairRecord:
    question_id: Any
    category: str
    turn: int
    x: str
    y: str
    outcome: PairOutcome
    verdicts: tuple[Any, Any]


def combine_games(judged: Sequence[Judged]) -> list[PairRecord]:
    """Match game 1 and game 2 of each comparison and combine their verdicts."""
    games: dict[tuple, dict[int, Judged]] = defaultdict(dict)
    for j in judged:
        m = j.call.meta
        games[(str(m["question_id"]), m["turn"], m["model_x"], m["model_y"])][m["game"]] = j
    records = []
    for (_, turn, x, y), g in games.items():
        v1 = g[1].parsed.value if 1 in g else None
        v2 = g[2].parsed.value if 2 in g else None
        meta = (g.get(1) or g[2]).call.meta
        records.append(PairRecord(meta["question_id"], meta["category"], turn, x, y,
                                  combine_verdicts(v1, v2), (v1, v2)))
    return records


# --------------------------------------------------------------------------------------------
# Candidate answers
# --------------------------------------------------------------------------------------------


def generate_answers(backend: JudgeBackend, questions: Sequence[Question], temperature: float,
                     max_tokens: int) -> dict[str, list[str]]:
    """Each question's turns answered in order, the candidate seeing its own earlier replies."""
    replies: dict[str, list[str]] = {q.key: [] for q in questions}
    for t in range(1, max(len(q.turns) for q in questions) + 1):
        todo = [q for q in questions if len(q.turns) >= t]
        chats = [answer_messages(q.turns, replies[q.key], t, q.system) for q in todo]
        outs = backend.complete(chats, temperature=temperature, max_tokens=max_tokens)
        if len(outs) != len(chats):
            raise BackendError(f"{getattr(backend, 'name', 'candidate')!r} returned "
                               f"{len(outs)} replies for {len(chats)} prompts")
        for q, text in zip(todo, outs):
            replies[q.key].append(text if isinstance(text, str) else "")
    return replies


def safe_name(name: str) -> str:
    """A file-name-safe version of a model name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"


# --------------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------------


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def judge_health(judged: Sequence[Judged]) -> dict[str, Any]:
    n = len(judged)
    malformed = sum(not j.parsed.ok for j in judged)
    lenient = sum(j.parsed.ok and not j.parsed.strict for j in judged)
    problems: dict[str, int] = defaultdict(int)
    for j in judged:
        if not j.parsed.ok:
            problems[j.parsed.problem or "malformed"] += 1
    return {"judgments": n, "malformed": malformed, "malformed_rate": malformed / n if n else None,
            "lenient_parses": lenient, "malformed_reasons": dict(problems)}


def summarize_single(judged: Sequence[Judged], models: Sequence[str]) -> dict[str, Any]:
    per_model: dict[str, Any] = {}
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
        per_model[m] = {"score": _mean(scores), "graded": len(scores),
                        "malformed": len(mine) - len(scores),
                        "turns": {str(t): _mean(v) for t, v in sorted(turns.items())},
                        "categories": {c: _mean(v) for c, v in sorted(cats.items())}}
    return {"models": per_model,
            "per_question": {q: {m: {str(t): s for t, s in v.items()} for m, v in d.items()}
                             for q, d in per_question.items()}}


def _pair_stats(records: Sequence[PairRecord]) -> dict[str, Any]:
    return summarize(r.outcome for r in records).to_dict()


def summarize_pairwise(records: Sequence[PairRecord], models: Sequence[str]) -> dict[str, Any]:
    by_pair: dict[tuple[str, str], list[PairRecord]] = defaultdict(list)
    for r in records:
        by_pair[(r.x, r.y)].append(r)
    pairs = [{"model_a": x, "model_b": y, **_pair_stats(rs)} for (x, y), rs in by_pair.items()]
    per_model = {}
    for m in models:
        flipped = []
        for r in records:
            if r.x == m:
                flipped.append(r.outcome)
            elif r.y == m:
                o = r.outcome
                flipped.append(PairOutcome({"win": "loss", "loss": "win"}.get(o.outcome, o.outcome),
                                           o.consistent))
        s = summarize(flipped)
        per_model[m] = {k: getattr(s, k) for k in ("wins", "losses", "ties", "invalid", "win_rate")}
    overall = summarize(r.outcome for r in records)
    return {"pairs": pairs, "models": per_model, "consistency": overall.consistency,
            "inconsistent": overall.inconsistent, "invalid_pairs": overall.invalid,
            "comparisons": overall.pairs}


def summarize_winrate(records: Sequence[PairRecord], answers: dict[str, dict[str, list[str]]],
                      reference: str, models: Sequence[str]) -> dict[str, Any]:
    out = {}
    for m in models:
        if m == reference:
            continue
        mine = [r for r in records if r.x == m and r.y == reference]
        valid = [r for r in mine if r.outcome.preference is not None]
        prefs = [r.outcome.preference for r in valid]
        len_m = [len(answers[m][str(r.question_id)][r.turn - 1]) for r in valid]
        len_r = [len(answers[reference][str(r.question_id)][r.turn - 1]) for r in valid]
        raw = win_rate(prefs)
        lc = length_controlled_win_rate(prefs, len_m, len_r)
        stats = summarize(r.outcome for r in mine)
        out[m] = {"comparisons": len(mine), "wins": raw.wins, "losses": raw.losses,
                  "ties": raw.ties, "invalid": stats.invalid, "inconsistent": stats.inconsistent,
                  "win_rate": raw.win_rate, "stderr": raw.stderr,
                  "lc_win_rate": lc.lc_win_rate, "lc_stderr": lc.stderr,
                  "length_coef": lc.length_coef, "consistency": stats.consistency,
                  "avg_length": _mean(len_m), "reference_avg_length": _mean(len_r)}
    return {"reference_model": reference, "models": out}


def summarize_chatbench(judged: Sequence[Judged], models: Sequence[str],
                        questions: Sequence[Question]) -> dict[str, Any]:
    per_model = {}
    for m in models:
        mine = [j for j in judged if j.call.meta["model"] == m]
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
                    if all(j.parsed.ok for j in v)
                    and len(v) == len(next(q for q in questions if q.key == k).turns)}
        passed = sum(all(j.parsed.value == "PASS" for j in v) for v in complete.values())
        per_model[m] = {
            "pass_rate": _mean([float(j.parsed.value == "PASS") for j in valid]),
            "passed": sum(j.parsed.value == "PASS" for j in valid), "graded": len(valid),
            "malformed": len(mine) - len(valid),
            "conversations_fully_passed": passed, "conversations_graded": len(complete),
            "turns": {str(t): _mean(v) for t, v in sorted(turns.items())},
            "categories": {c: _mean(v) for c, v in sorted(cats.items())},
            "per_conversation": {k: [j.parsed.value for j in sorted(v, key=lambda j: j.call.meta["turn"])]
                                 for k, v in convs.items()}}
    return {"models": per_model}


def battles_from(records: Sequence[PairRecord], judge_name: str) -> list[dict[str, Any]]:
    """Combined verdicts as Chatbot Arena battles (malformed pairs are left out)."""
    out = []
    for r in records:
        winner = battle_winner(r.outcome.outcome)
        if winner:
            out.append({"model_a": r.x, "model_b": r.y, "winner": winner,
                        "question_id": r.question_id, "turn": r.turn, "judge": judge_name})
    return out


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _desc(x: float | None) -> float:
    """Sort key: larger first, missing/NaN last."""
    return -x if x is not None and x == x else float("inf")


def _health_section(health: dict[str, Any], examples: Sequence[Judged]) -> list[str]:
    lines = ["## Judge reliability", "",
             f"- judgments: {health['judgments']}",
             f"- malformed verdicts (no verdict could be read; excluded): {health['malformed']}"
             + (f" ({fmt_pct(health['malformed_rate'])})" if health["malformed_rate"] is not None else ""),
             f"- lenient parses (verdict not in the requested `[[...]]` form but readable): "
             f"{health['lenient_parses']}"]
    for reason, count in sorted(health["malformed_reasons"].items()):
        lines.append(f"  - {md_escape(reason)}: {count}")
    if examples:
        lines += ["", "Examples of malformed judgments (raw judge output, truncated):", ""]
        for j in examples:
            meta = j.call.meta
            who = meta.get("model") or f"{meta.get('model_a')} vs {meta.get('model_b')}"
            lines.append(f"- question {md_escape(meta['question_id'])}, turn {meta['turn']}, "
                         f"{md_escape(who)}: {md_escape(j.parsed.problem)}")
            text = j.text if len(j.text) <= 600 else j.text[:600] + " …"
            lines += ["", md_code_block(text)]
    return lines


def render_report(results: dict[str, Any], judged: Sequence[Judged]) -> str:
    mode = results["mode"]
    judge = results["judge"]
    q = results["questions"]
    lines = [f"# Judge report: {mode}", "",
             f"- judge: {md_escape(judge['model'])}"
             + (f" at {md_escape(judge['url'])}" if judge.get("url") else " (local)"),
             f"- questions: {q['count']} from {md_escape(q['source'])} "
             f"({', '.join(md_escape(c) for c in q['categories'])})",
             f"- candidates: {', '.join(md_escape(m) for m in results['models'])}",
             ""]
    s = results["summary"]
    if mode == "single":
        models = list(s["models"])
        turn_keys = sorted({t for v in s["models"].values() for t in v["turns"]}, key=int)
        rows = []
        for m in sorted(models, key=lambda m: _desc(s["models"][m]["score"])):
            v = s["models"][m]
            rows.append([md_escape(m, 60), fmt_num(v["score"], 2)]
                        + [fmt_num(v["turns"].get(t), 2) for t in turn_keys]
                        + [v["graded"], v["malformed"]])
        lines += ["## Scores (1–10)", "",
                  md_table(["model", "mean"] + [f"turn {t}" for t in turn_keys] + ["graded", "malformed"],
                           rows, ["l", "r"] + ["r"] * len(turn_keys) + ["r", "r"])]
        cats = sorted({c for v in s["models"].values() for c in v["categories"]})
        lines += ["## By category", "",
                  md_table(["category"] + [md_escape(m, 30) for m in models],
                           [[md_escape(c)] + [fmt_num(s["models"][m]["categories"].get(c), 2)
                                              for m in models] for c in cats],
                           ["l"] + ["r"] * len(models)),
                  "![scores by category](scores.png)", ""]
        qrows = []
        for qid, d in s["per_question"].items():
            cells = [md_escape(qid)]
            for m in models:
                per_turn = d.get(m, {})
                cells.append(" / ".join(fmt_num(per_turn.get(t), 1, "×" if t in per_turn else "—")
                                        for t in sorted(per_turn, key=int)) or "—")
            qrows.append(cells)
        lines += ["## Per question", "", "Scores per turn (× = malformed verdict, — = no answer).",
                  "", md_table(["question"] + [md_escape(m, 30) for m in models], qrows), ""]
    elif mode == "pairwise":
        rows = [[md_escape(p["model_a"], 40), md_escape(p["model_b"], 40), p["wins"], p["losses"],
                 p["ties"], p["inconsistent"], p["invalid"], fmt_pct(p["win_rate"]),
                 fmt_pct(p["consistency"])] for p in s["pairs"]]
        lines += ["## Pairs", "",
                  "Wins/losses/ties of model A against model B (each comparison judged in both "
                  "orders; disagreeing verdicts count as ties and are also listed as "
                  "*inconsistent*; comparisons with a malformed verdict are *invalid* and left out).",
                  "", md_table(["model A", "model B", "wins", "losses", "ties", "inconsistent",
                                "invalid", "A's win rate", "consistency"], rows,
                               ["l", "l", "r", "r", "r", "r", "r", "r", "r"]),
                  f"Position consistency of the judge over all comparisons: "
                  f"{fmt_pct(s['consistency'])}.", ""]
        rows = [[md_escape(m, 60), v["wins"], v["losses"], v["ties"], fmt_pct(v["win_rate"])]
                for m, v in sorted(s["models"].items(), key=lambda kv: _desc(kv[1]["win_rate"]))]
        lines += ["## Per model (against all others)", "",
                  md_table(["model", "wins", "losses", "ties", "win rate"], rows,
                           ["l", "r", "r", "r", "r"])]
        if s.get("ratings"):
            rrows = [[md_escape(r["model"], 60), fmt_num(r["bt"]),
                      (f"{fmt_num(r['bt_ci_low'])} – {fmt_num(r['bt_ci_high'])}"
                       if r["bt_ci_low"] is not None else "—"), r["battles"]]
                     for r in s["ratings"]]
            lines += ["## Bradley–Terry ratings from these battles", "",
                      md_table(["model", "BT", "95% CI", "battles"], rrows, ["l", "r", "c", "r"]),
                      "![ratings](ratings.png)", ""]
    elif mode == "winrate":
        ref = s["reference_model"]
        rows = [[md_escape(m, 60), fmt_pct(v["win_rate"]) + f" ± {fmt_pct(v['stderr'])}",
                 fmt_pct(v["lc_win_rate"]) + f" ± {fmt_pct(v['lc_stderr'])}", v["wins"],
                 v["losses"], v["ties"], v["invalid"], fmt_pct(v["consistency"]),
                 fmt_num(v["avg_length"], 0), fmt_num(v["reference_avg_length"], 0)]
                for m, v in s["models"].items()]
        lines += [f"## Win rate against {md_escape(ref)}", "",
                  "Raw win rate counts ties as half a win; the length-controlled (LC) win rate is "
                  "the win rate predicted at zero length difference by a logistic regression of "
                  "the preference on tanh(length difference / its std). ± one standard error. "
                  "Lengths in characters.", "",
                  md_table(["model", "win rate", "LC win rate", "wins", "losses", "ties",
                            "invalid", "consistency", "avg length", "ref avg length"], rows,
                           ["l", "r", "r", "r", "r", "r", "r", "r", "r", "r"]),
                  "![win rates](winrate.png)", ""]
    elif mode == "chat-bench":
        rows = [[md_escape(m, 60), fmt_pct(v["pass_rate"]), f"{v['passed']}/{v['graded']}",
                 f"{v['conversations_fully_passed']}/{v['conversations_graded']}", v["malformed"]]
                for m, v in s["models"].items()]
        lines += ["## Pass rates", "",
                  md_table(["model", "turns passed", "count", "conversations fully passed",
                            "malformed"], rows, ["l", "r", "r", "r", "r"])]
        models = list(s["models"])
        convs = sorted({k for v in s["models"].values() for k in v["per_conversation"]})
        crow = []
        for k in convs:
            cells = [md_escape(k)]
            for m in models:
                verdicts = s["models"][m]["per_conversation"].get(k)
                cells.append(" ".join({"PASS": "✓", "FAIL": "✗"}.get(v, "?") for v in verdicts)
                             if verdicts else "—")
            crow.append(cells)
        lines += ["## Per conversation", "", "One mark per turn: ✓ pass, ✗ fail, ? malformed.", "",
                  md_table(["script"] + [md_escape(m, 30) for m in models], crow),
                  "![pass rates](chat_bench.png)", ""]
    examples = [j for j in judged if not j.parsed.ok][:3]
    lines += _health_section(results["judge_health"], examples)
    lines += ["", "Raw judgments with their prompts: `judgments.jsonl`; numbers: `results.json`.", ""]
    return "\n".join(lines)


def _bar_plot(path: Path, groups: Sequence[str], series: dict[str, Sequence[float]],
              ylabel: str, title: str, ylim: tuple[float, float] | None = None,
              errors: dict[str, Sequence[float]] | None = None) -> None:
    import numpy as np

    fig = new_figure(min(11.0, max(6.0, 0.6 * len(groups) * max(1, len(series)) ** 0.5 + 2)), 4.2)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(1, len(series))
    x = np.arange(len(groups))
    for i, (name, values) in enumerate(series.items()):
        vals = np.array([v if v is not None else np.nan for v in values], dtype=float)
        err = None
        if errors and name in errors:
            err = np.array([e if e is not None else 0.0 for e in errors[name]], dtype=float)
            err = np.nan_to_num(err)
        ax.bar(x + (i - (len(series) - 1) / 2) * width, np.nan_to_num(vals), width, yerr=err,
               capsize=3 if err is not None else 0, label=name if len(name) <= 30 else name[:29] + "…")
    ax.set_xticks(x)
    ax.set_xticklabels([g if len(g) <= 18 else g[:17] + "…" for g in groups], rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if ylim:
        ax.set_ylim(*ylim)
    ax.grid(axis="y", alpha=0.3)
    if len(series) > 1 or errors:
        ax.legend(fontsize=8)
    save_figure(fig, path)


def write_plots(out: Path, results: dict[str, Any]) -> None:
    mode, s = results["mode"], results["summary"]
    if mode == "single":
        cats = sorted({c for v in s["models"].values() for c in v["categories"]})
        _bar_plot(out / "scores.png", cats + ["overall"],
                  {m: [v["categories"].get(c) for c in cats] + [v["score"]]
                   for m, v in s["models"].items()}, "mean score (1–10)", "Judge scores", (0, 10))
    elif mode == "winrate" and s["models"]:
        names = list(s["models"])
        _bar_plot(out / "winrate.png", names,
                  {"win rate": [s["models"][m]["win_rate"] for m in names],
                   "length-controlled": [s["models"][m]["lc_win_rate"] for m in names]},
                  f"vs {s['reference_model']}", "Win rate against the reference", (0, 1),
                  errors={"win rate": [s["models"][m]["stderr"] for m in names],
                          "length-controlled": [s["models"][m]["lc_stderr"] for m in names]})
    elif mode == "chat-bench":
        cats = sorted({c for v in s["models"].values() for c in v["categories"]})
        _bar_plot(out / "chat_bench.png", cats + ["overall"],
                  {m: [v["categories"].get(c) for c in cats] + [v["pass_rate"]]
                   for m, v in s["models"].items()}, "pass rate", "Chat-bench", (0, 1))


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def select_questions(cfg: Config) -> tuple[list[Question], str]:
    spec = cfg.questions
    if spec.startswith("builtin"):
        name = spec.partition(":")[2] or ("chat-bench" if cfg.mode == "chat-bench" else "mt")
        path, source = builtin_path(name), f"builtin:{name}"
    else:
        path, source = Path(spec), spec
    questions = load_questions(path, require_checks=cfg.mode == "chat-bench")
    if cfg.categories:
        wanted = set(cfg.categories)
        questions = [q for q in questions if q.category in wanted]
        if not questions:
            raise InputError(f"--categories: no questions in {', '.join(sorted(wanted))} "
                             f"({source})")
    if cfg.limit:
        questions = questions[:cfg.limit]
    if cfg.reference_answers:
        refs = load_answers([cfg.reference_answers])
        for replies in refs.values():
            for q in questions:
                if not q.reference and q.key in replies:
                    q.reference = list(replies[q.key])
    return questions, source


def check_candidates(cfg: Config, file_models: Sequence[str], generated: Sequence[str]) -> None:
    """Names unique, enough candidates for the mode, the reference among them (before any work)."""
    names = list(file_models) + list(generated)
    problems = []
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        problems.append(f"candidate names given twice (answer files, --model, --model-name): "
                        f"{', '.join(dupes)}")
    if cfg.mode == "pairwise" and len(set(names)) < 2:
        problems.append(f"--mode pairwise needs at least two candidates (got {len(set(names))})")
    if cfg.mode == "winrate":
        if cfg.reference_model not in names:
            problems.append(f"--reference-model {cfg.reference_model!r} is not among the "
                            f"candidates ({', '.join(names)})")
        elif len(set(names)) < 2:
            problems.append("--mode winrate needs at least one candidate besides the reference")
    if problems:
        raise InputError(problems)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(cfg: Config, judge: JudgeBackend,
        candidates: Sequence[tuple[str, Callable[[], JudgeBackend]]] = (),
        log: Callable[[str], None] | None = _log) -> dict[str, Any]:
    """The whole command given a judge and candidate backends (factories, built one at a time).

    Returns the contents of ``results.json``. ``main`` builds the backends from the flags;
    tests call this with fakes.
    """
    questions, source = select_questions(cfg)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)

    answers = load_answers(cfg.answers) if cfg.answers else {}
    check_candidates(cfg, list(answers), [name for name, _ in candidates])
    models = list(answers)
    for name, factory in candidates:
        if log:
            log(f"generating answers with {name} ...")
        backend = factory()
        try:
            answers[name] = generate_answers(backend, questions, cfg.temperature, cfg.max_new_tokens)
        finally:
            close = getattr(backend, "close", None)
            if close:
                close()
        write_jsonl(out / "answers" / f"{safe_name(name)}.jsonl",
                    answer_records(name, questions, answers[name]))
        models.append(name)

    problems = [f"candidate {m!r} has no answer to any of the {len(questions)} questions "
                f"({source}); check the question_id values"
                for m in models if not any(q.key in answers[m] for q in questions)]
    if problems:
        raise InputError(problems)

    if cfg.mode == "single":
        calls = single_calls(questions, answers, models)
    elif cfg.mode == "chat-bench":
        calls = chatbench_calls(questions, answers, models)
    elif cfg.mode == "pairwise":
        pairs = [(models[i], models[j]) for i in range(len(models)) for j in range(i + 1, len(models))]
        calls = pairwise_calls(questions, answers, pairs)
    else:
        pairs = [(m, cfg.reference_model) for m in models if m != cfg.reference_model]
        calls = pairwise_calls(questions, answers, pairs)
    missing = {m: sum(len(q.turns) - available_turns(answers[m], q) for q in questions)
               for m in models}

    judge_name = getattr(judge, "name", type(judge).__name__)
    if log:
        log(f"{len(calls)} judge calls ({cfg.mode}) with judge {judge_name}")
    with JsonlWriter(out / "judgments.jsonl") as sink:
        judged = execute(judge, calls, cfg.judge_temperature, cfg.judge_max_tokens, sink, log)

    records: list[PairRecord] = []
    battles: list[dict[str, Any]] = []
    if cfg.mode == "single":
        summary = summarize_single(judged, models)
    elif cfg.mode == "chat-bench":
        summary = summarize_chatbench(judged, models, questions)
    else:
        records = combine_games(judged)
        battles = battles_from(records, judge_name)
        if cfg.mode == "pairwise":
            summary = summarize_pairwise(records, models)
            if battles:
                from rlhfkit.evaluation.arena import Battle, plot_ratings, rate

                arena = rate([Battle(b["model_a"], b["model_b"], b["winner"]) for b in battles],
                             bootstrap=200, seed=cfg.seed)
                summary["ratings"] = arena.rows()
                plot_ratings(arena, out / "ratings.png")
        else:
            summary = summarize_winrate(records, answers, cfg.reference_model, models)

    results = {
        "mode": cfg.mode,
        "judge": {"model": judge_name, "url": redact_url(cfg.judge_url) or None,
                  "temperature": cfg.judge_temperature},
        "questions": {"source": source, "count": len(questions),
                      "categories": sorted({q.category for q in questions})},
        "models": models,
        "missing_answers": missing,
        "summary": summary,
        "judge_health": judge_health(judged),
    }
    if cfg.emit_battles:
        path = Path(cfg.emit_battles)
        if path.suffix == ".json":
            write_json(path, battles)
        else:
            write_jsonl(path, battles)
        results["battles_file"] = str(path)
        results["battles"] = len(battles)
    write_json(out / "results.json", results)
    write_text(out / "report.md", render_report(results, judged))
    write_plots(out, results)
    return results


def make_judge(cfg: Config) -> JudgeBackend:
    if cfg.judge_url:
        return OpenAIChatBackend(cfg.judge_url, cfg.judge_model,
                                 api_key=os.environ.get(cfg.judge_api_key_env) or None,
                                 timeout=cfg.request_timeout, concurrency=cfg.concurrency,
                                 role="judge", key_env=cfg.judge_api_key_env)
    return LocalBackend(cfg.judge_model or DEFAULT_LOCAL_JUDGE, dtype=cfg.dtype,
                        batch_size=cfg.batch_size, seed=cfg.seed)


def candidate_factories(cfg: Config) -> list[tuple[str, Callable[[], JudgeBackend]]]:
    out: list[tuple[str, Callable[[], JudgeBackend]]] = []
    for name in cfg.model:
        out.append((name, lambda name=name: LocalBackend(name, dtype=cfg.dtype,
                                                         batch_size=cfg.batch_size, seed=cfg.seed)))
    key = os.environ.get(cfg.model_api_key_env) or None
    for name in cfg.model_name:
        out.append((name, lambda name=name: OpenAIChatBackend(
            cfg.model_url, name, api_key=key, timeout=cfg.request_timeout,
            concurrency=cfg.concurrency, role="candidate", key_env=cfg.model_api_key_env)))
    return out


def main(cfg: Config) -> int:
    candidates = candidate_factories(cfg)
    # Questions, answer files and candidate names are checked before any model is loaded.
    select_questions(cfg)
    file_models = list(load_answers(cfg.answers)) if cfg.answers else []
    check_candidates(cfg, file_models, [name for name, _ in candidates])
    try:
        judge = make_judge(cfg)
        try:
            results = run(cfg, judge, candidates)
        finally:
            close = getattr(judge, "close", None)
            if close:
                close()
    except BackendError as e:
        print(f"error: {e}", file=sys.stderr)
        print(f"(judgments made so far are in {Path(cfg.output) / 'judgments.jsonl'})",
              file=sys.stderr)
        return 1
    _print_summary(results)
    return 0


def _print_summary(results: dict[str, Any]) -> None:
    mode, s = results["mode"], results["summary"]
    print(f"judge {results['judge']['model']}: {mode} on {results['questions']['count']} questions")
    if mode == "single":
        for m, v in s["models"].items():
            print(f"  {m}: {v['score']:.2f} / 10 ({v['graded']} graded, {v['malformed']} malformed)")
    elif mode == "pairwise":
        for p in s["pairs"]:
            print(f"  {p['model_a']} vs {p['model_b']}: {p['wins']}-{p['losses']}-{p['ties']} "
                  f"(win rate {p['win_rate']:.3f}, consistency {p['consistency']:.3f})")
    elif mode == "winrate":
        for m, v in s["models"].items():
            print(f"  {m} vs {s['reference_model']}: win rate {v['win_rate']:.3f}, "
                  f"LC {v['lc_win_rate']:.3f}")
    else:
        for m, v in s["models"].items():
            print(f"  {m}: pass rate {v['pass_rate']:.3f} ({v['passed']}/{v['graded']})")
    h = results["judge_health"]
    print(f"  malformed verdicts: {h['malformed']}/{h['judgments']}")
