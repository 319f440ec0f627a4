"""``rlhfkit judge``: LLM-as-judge grading, pairwise comparison, win rates and chat-bench.

Modes (``--mode``):

* ``single``: each answer graded 1–10 in MT-Bench's manner (the judge explains, then writes
  ``[[rating]]``); turn 2 of a two-turn question is graded in the context of turn 1; a
  question with a reference answer (math, reasoning) is graded against it. Means carry their
  standard error over questions; ``--repeats R`` grades each answer R times at
  ``--judge-temperature`` and adds the judge's own spread.
* ``pairwise``: every pair of candidates compared on every question and turn, judged in both
  orders; disagreeing verdicts count as a tie; wins, losses, ties, win rate and the judge's
  position-consistency rate per pair, plus Bradley–Terry ratings over the judged battles.
* ``winrate``: every candidate against ``--baseline`` (AlpacaEval style): raw win rate
  and length-controlled win rate (:mod:`rlhfkit.evaluation.winrate`).
* ``chat-bench``: scripted multi-turn conversations; each reply graded ``[[PASS]]``/``[[FAIL]]``
  against that turn's requirement.

Each mode is one module under :mod:`rlhfkit.evaluation.judging.modes`, found by name in its
``MODES`` registry; this module holds the flags and runs the steps every mode shares.

Candidates come from answer files (``--answers``, MT-Bench's model_answer format or simpler
shapes, see :mod:`rlhfkit.evaluation.judging.data`), from local models (``--model``), or from
an OpenAI-compatible endpoint (``--model-url`` with ``--model-name``). The judge is an
endpoint (``--judge-url`` and ``--judge-model``; key from ``--judge-api-key-env``) or a local
model (``--judge-model``, default ``smollm2-135m``).

Outputs in ``--output``: ``results.json``, ``report.md``, ``judgments.jsonl`` (every raw judge
reply with its prompt and parsed verdict), ``requests.jsonl`` (the judge's replies keyed by request:
run the same command again into the same directory and only the missing ones are sent),
``config.yaml``, ``answers/MODEL.jsonl`` for generated answers, a PNG per mode, and with
``--emit-battles FILE`` the pairwise verdicts as Chatbot Arena battles for ``rlhfkit arena``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from rlhfkit.config import arg, save_config, validated
from rlhfkit.data.io import write_jsonl
from rlhfkit.errors import InputError
from rlhfkit.evaluation.judging.calls import (
    JudgeHealth,
    available_turns,
    backend_name,
    execute,
    judge_health,
    with_repeats,
)
from rlhfkit.evaluation.judging.candidates import Factory, gather_answers
from rlhfkit.evaluation.judging.data import Question, builtin_path, load_answers, load_questions
from rlhfkit.evaluation.judging.modes import MODES, JudgedRun, Summary
from rlhfkit.evaluation.judging.report import render_report
from rlhfkit.evaluation.report import JsonlWriter, write_json, write_text
from rlhfkit.models.backends import BackendError, JudgeBackend, ReplyJournal, make_backend, redact_url

Mode = Literal["single", "pairwise", "winrate", "chat-bench"]  # the keys of MODES (a test keeps them equal)
DEFAULT_LOCAL_JUDGE = "smollm2-135m"


@dataclass
class Config:
    """Judge candidate answers with an LLM: single grading, pairwise, win rate, chat-bench."""

    output: str = arg("", "Output directory: results.json, report.md, judgments.jsonl, plots.")
    mode: Mode = arg("single", "single: 1-10 grades; pairwise: all pairs, both orders; winrate: "
                     "each candidate vs --baseline with a length-controlled win rate; "
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
    baseline: str = arg("", "winrate mode: the candidate every other one is compared against.",
                        aliases=("reference_model",))
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
    judge_max_new_tokens: int = arg(512, "Maximum tokens of each judgment.", aliases=("judge_max_tokens",))
    judge_temperature: float = arg(0.0, "Judge sampling temperature (0: greedy/deterministic).")
    repeats: int = arg(1, "single mode: grade every answer R times at --judge-temperature (> 0); the "
                       "report adds the judge's own spread (mean per-answer sd, standard error from the judge).")
    concurrency: int = arg(4, "Concurrent requests per endpoint.")
    request_timeout: float = arg(120.0, "Seconds to wait for one endpoint request.")
    generation_batch_size: int = arg(4, "Prompts per generate call of a local model (candidates and judge).",
                                     aliases=("batch_size",))
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
        if MODES[self.mode].needs_reference and not self.baseline:
            problems.append(f"--mode {self.mode} needs --baseline")
        if self.emit_battles and not MODES[self.mode].emits_battles:
            battle_modes = " or ".join(name for name, mode in MODES.items() if mode.emits_battles)
            problems.append(f"--emit-battles needs --mode {battle_modes}")
        for name in ("limit",):
            if getattr(self, name) < 0:
                problems.append(f"--{name} must be >= 0")
        for name in ("max_new_tokens", "judge_max_new_tokens", "concurrency", "generation_batch_size"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be >= 1")
        for name in ("temperature", "judge_temperature"):
            if getattr(self, name) < 0:
                problems.append(f"--{name.replace('_', '-')} must be >= 0")
        if self.repeats < 1:
            problems.append("--repeats must be >= 1")
        elif self.repeats > 1 and not MODES[self.mode].repeatable:
            modes = " or ".join(name for name, mode in MODES.items() if mode.repeatable)
            problems.append(f"--repeats needs --mode {modes}")
        elif self.repeats > 1 and not self.judge_temperature > 0:
            problems.append("--repeats needs --judge-temperature > 0 (at 0 every repeat is the same greedy verdict)")
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


def select_questions(cfg: Config) -> tuple[list[Question], str]:
    mode = MODES[cfg.mode]
    spec = cfg.questions
    if spec.startswith("builtin"):
        name = spec.partition(":")[2] or mode.question_set
        path, source = builtin_path(name), f"builtin:{name}"
    else:
        path, source = Path(spec), spec
    questions = load_questions(path, require_checks=mode.needs_checks)
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
    problems += MODES[cfg.mode].candidate_problems(names, cfg.baseline)
    if problems:
        raise InputError(problems)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Outcome:
    """One run: the contents of results.json and the typed summaries behind them."""

    results: dict[str, Any]
    summary: Summary
    health: JudgeHealth


def evaluate(cfg: Config, judge: JudgeBackend, candidates: Sequence[tuple[str, Factory]] = (),
             log: Callable[[str], None] | None = _log) -> Outcome:
    """The whole command given a judge and candidate backends; writes every output file."""
    mode = MODES[cfg.mode]
    questions, source = select_questions(cfg)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    file_answers = load_answers(cfg.answers) if cfg.answers else {}
    check_candidates(cfg, list(file_answers), [name for name, _ in candidates])
    answers, models = gather_answers(file_answers, candidates, questions, source, cfg.temperature,
                                     cfg.max_new_tokens, out / "answers", log)

    calls = with_repeats(mode.calls(questions, answers, models, cfg.baseline), cfg.repeats)
    missing = {m: sum(len(q.turns) - available_turns(answers[m], q) for q in questions) for m in models}
    judge_name = backend_name(judge)
    if log:
        log(f"{len(calls)} judge calls ({cfg.mode}) with judge {judge_name}")
    with JsonlWriter(out / "judgments.jsonl") as sink:
        judged = execute(judge, calls, cfg.judge_temperature, cfg.judge_max_new_tokens, sink, log,
                         journal=ReplyJournal(out / "requests.jsonl"))
    summary = mode.summarize(JudgedRun(questions, answers, models, judged, judge_name,
                                       cfg.baseline, cfg.seed, cfg.repeats))
    health = judge_health(judged)

    results = {
        "mode": cfg.mode,
        "judge": {"model": judge_name, "url": redact_url(cfg.judge_url) or None,
                  "temperature": cfg.judge_temperature, "repeats": cfg.repeats},
        "questions": {"source": source, "count": len(questions),
                      "categories": sorted({q.category for q in questions})},
        "models": models,
        "missing_answers": missing,
        "summary": summary.to_dict(),
        "judge_health": health.to_dict(),
    }
    if cfg.emit_battles:
        path = Path(cfg.emit_battles)
        (write_json if path.suffix == ".json" else write_jsonl)(path, list(summary.battles))
        results["battles_file"] = str(path)
        results["battles"] = len(summary.battles)
    write_json(out / "results.json", results)
    write_text(out / "report.md", render_report(results, summary.report_lines(), health, judged))
    summary.write_plots(out)
    return Outcome(results, summary, health)


def run(cfg: Config, judge: JudgeBackend, candidates: Sequence[tuple[str, Factory]] = (),
        log: Callable[[str], None] | None = _log) -> dict[str, Any]:
    """The whole command given a judge and candidate backends (factories, built one at a time).

    Returns the contents of ``results.json``. ``main`` builds the backends from the flags;
    tests call this with fakes.
    """
    return evaluate(cfg, judge, candidates, log).results


def make_judge(cfg: Config) -> JudgeBackend:
    return make_backend(cfg.judge_model or DEFAULT_LOCAL_JUDGE, cfg.judge_url, cfg.judge_model,
                        cfg.judge_api_key_env, role="judge", concurrency=cfg.concurrency,
                        timeout=cfg.request_timeout, dtype=cfg.dtype, batch_size=cfg.generation_batch_size,
                        seed=cfg.seed)


def candidate_factories(cfg: Config) -> list[tuple[str, Factory]]:
    out: list[tuple[str, Factory]] = []
    endpoints = [(name, "", name) for name in cfg.model] + [("", cfg.model_url, name) for name in cfg.model_name]
    for local, url, name in endpoints:
        out.append((name, lambda local=local, url=url, name=name: make_backend(
            local, url, name, cfg.model_api_key_env, role="candidate", concurrency=cfg.concurrency,
            timeout=cfg.request_timeout, dtype=cfg.dtype, batch_size=cfg.generation_batch_size, seed=cfg.seed)))
    return out


def main(cfg: Config) -> int:
    candidates = candidate_factories(validated(cfg))
    # Questions, answer files and candidate names are checked before any model is loaded.
    select_questions(cfg)
    file_models = list(load_answers(cfg.answers)) if cfg.answers else []
    check_candidates(cfg, file_models, [name for name, _ in candidates])
    try:
        judge = make_judge(cfg)
        try:
            outcome = evaluate(cfg, judge, candidates)
        finally:
            close = getattr(judge, "close", None)
            if close:
                close()
    except BackendError as e:
        print(f"error: {e}", file=sys.stderr)
        print(f"(judgments made so far are in {Path(cfg.output) / 'judgments.jsonl'})",
              file=sys.stderr)
        return 1
    results, health = outcome.results, outcome.health
    print(f"judge {results['judge']['model']}: {cfg.mode} on {results['questions']['count']} questions")
    for line in outcome.summary.console_lines():
        print(line)
    print(f"  malformed verdicts: {health.malformed}/{health.judgments}")
    return 0
