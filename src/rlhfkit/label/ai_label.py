"""``rlhfkit ai-label``: preference pairs labelled by an AI judge (RLAIF, Constitutional AI's feedback phase).

For every comparison of two replies ``a`` and ``b`` to one prompt:

1. one principle of the constitution (``--constitution``) is sampled, seeded per comparison: the
   same comparison gets the same principle in every run, so a resumed run asks the same questions;
2. the judge is asked which reply better follows the principle's ``preference`` text (carried
   verbatim, like both replies: :func:`~rlhfkit.evaluation.judging.prompts.principle_pairwise_messages`),
   in both presentation orders: ``a`` shown as A, then ``b`` shown as A;
3. each verdict is read (``[[A]]``/``[[B]]``/``[[C]]``, :mod:`rlhfkit.label.verdicts`). An unparseable
   one is asked once more (the judge's reply and a reminder of the format added to the chat, a
   request of its own), then counted as unparsed;
4. the two verdicts are combined from ``a``'s side
   (:func:`~rlhfkit.evaluation.judging.pairwise.combine_verdicts`): verdicts that agree give the label;
   verdicts that disagree are *position-inconsistent* and count as a tie, never as a confident
   label. Ties and inconsistent pairs are written only with ``--keep-ties``, marked ``tie: true``
   (``rm`` and ``dpo`` skip them); unparsed pairs are never written;
5. where the judge returns token log-probs, the soft label ``p_chosen``: the probability that the
   row's ``chosen`` is better, from the verdict tokens' normalised probabilities averaged over the
   two orders (:mod:`rlhfkit.label.verdicts`); ``null`` without log-probs. It is the pair's
   confidence; the label itself always comes from the verdicts.

Input (``--data``), one comparison per pair of replies: ``{prompt, response_a, response_b}``;
``{prompt, completions: [...]}`` (every pair, or ``--pairs-per-prompt N`` sampled with the seed;
identical replies are not compared); ``{prompt, chosen, rejected}`` (re-labelled: ``stats.json``
then reports the agreement with the existing labels). A prompt is a string or a list of messages.

Output (``--output``): ``preferences.jsonl`` (``{prompt, chosen, rejected}`` as ``rlhfkit rm`` and
``rlhfkit dpo`` read it, plus ``principle``, ``judge``, ``verdicts`` (the letter when ``chosen`` was
shown first and when ``rejected`` was), ``consistent``, ``p_chosen``, ``tie``, and for re-labelled
input ``label_agrees``), ``stats.json``, ``config.yaml`` and ``requests.jsonl`` (every judge reply
as it arrived: rerunning with the same ``--output`` sends no request twice).
"""

from __future__ import annotations

import itertools
import random
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhfkit.config import DATA_CONFIG_HELP, arg, check_data_flag, save_config, validated
from rlhfkit.data.constitution import Principle, load_constitution, seeded_principle
from rlhfkit.data.io import Record, read_records, write_jsonl
from rlhfkit.data.schema import check_text_or_messages, parse_preference
from rlhfkit.errors import InputError
from rlhfkit.evaluation.judging.pairwise import PairOutcome, combine_verdicts
from rlhfkit.evaluation.judging.prompts import principle_pairwise_messages
from rlhfkit.evaluation.report import write_json
from rlhfkit.label.verdicts import Verdict, p_first_of_pair, read_verdict
from rlhfkit.models.backends import (
    BackendError,
    JournaledModel,
    JudgeOptions,
    ReplyJournal,
    TransportOptions,
    endpoint_label,
    judge_backend,
    request_key,
)

FORMAT_REMINDER = ("Your reply did not end with a verdict in the required format. Answer again with only "
                   "one of [[A]], [[B]] or [[C]].")


@dataclass
class Config(JudgeOptions, TransportOptions):
    """Label preference pairs with an AI judge and a constitution (RLAIF)."""

    data: str = arg("", "Comparisons: {prompt, response_a, response_b}, {prompt, completions: [...]} or "
                    "{prompt, chosen, rejected} records (a file, a dataset id or a mixture, docs/data.md).")
    data_config: str = arg("", DATA_CONFIG_HELP)
    output: str = arg("", "Output directory: preferences.jsonl, stats.json, config.yaml, requests.jsonl "
                      "(rerun with the same directory to continue an interrupted run).")
    constitution: str = arg("builtin", "Principles: `builtin`, or a JSONL/YAML file of {name, critique, "
                            "revision, preference} records; one is sampled per comparison.")
    pairs_per_prompt: int = arg(0, "{prompt, completions} records: pairs compared per prompt, sampled with "
                                "--seed (0: every pair).")
    keep_ties: bool = arg(False, "Also write ties and position-inconsistent pairs, marked `tie: true`.")
    judge_max_new_tokens: int = arg(512, "Maximum tokens of each judgment.")
    judge_temperature: float = arg(0.0, "Judge sampling temperature (0: greedy).")
    top_logprobs: int = arg(5, "Alternatives per token asked of the judge for the soft label p_chosen "
                            "(0: none; endpoints allow at most 20).")
    seed: int = arg(0, "Seed of the principle sampled per comparison and of --pairs-per-prompt.")

    def validate(self) -> list[str]:
        problems = check_data_flag("data", self.data)
        if not self.output:
            problems.append("--output is required")
        if self.pairs_per_prompt < 0:
            problems.append("--pairs-per-prompt must be >= 0")
        if self.judge_max_new_tokens < 1:
            problems.append("--judge-max-new-tokens must be >= 1")
        if self.judge_temperature < 0:
            problems.append("--judge-temperature must be >= 0")
        if not 0 <= self.top_logprobs <= 20:
            problems.append("--top-logprobs must be between 0 and 20")
        return problems + self.judge_problems() + self.transport_problems()


# --------------------------------------------------------------------------------------------
# Comparisons from the input
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Comparison:
    """Two replies to one prompt; ``labelled``: the input says ``a`` is better (chosen/rejected input)."""

    prompt: Any
    a: Any
    b: Any
    source: Record | None = None  # None: comparisons made in memory (the demo's)
    labelled: bool = False

    @property
    def key(self) -> str:
        return request_key(self.prompt, self.a, self.b)


def reply_text(reply: Any) -> str:
    """A reply as the judge reads it: the string, or its messages' contents."""
    return reply if isinstance(reply, str) else "\n\n".join(m["content"] for m in reply)


def _replies_checked(rec: Record, fields: list[tuple[str, Any]], problems: list[str]) -> bool:
    ok = check_text_or_messages(rec, "prompt", rec.data.get("prompt"), problems)
    for name, value in fields:
        ok &= check_text_or_messages(rec, name, value, problems, assistant_only=True)
    return ok


def parse_comparisons(rec: Record, problems: list[str], pairs_per_prompt: int, seed: int) -> list[Comparison]:
    """The comparisons of one input record (problems named file:line:field)."""
    d = rec.data
    if "completions" in d:
        completions = d["completions"]
        if not isinstance(completions, list) or len(completions) < 2:
            problems.append(rec.problem("completions", "expected a list of at least 2 replies"))
            return []
        if not _replies_checked(rec, [(f"completions[{i}]", c) for i, c in enumerate(completions)], problems):
            return []
        pairs = [(i, j) for i, j in itertools.combinations(range(len(completions)), 2)
                 if completions[i] != completions[j]]
        if 0 < pairs_per_prompt < len(pairs):
            pairs = sorted(random.Random(f"rlhfkit-ai-label:{seed}:{rec.file}:{rec.line}").sample(
                pairs, pairs_per_prompt))
        return [Comparison(d["prompt"], completions[i], completions[j], rec) for i, j in pairs]
    if "chosen" in d or "rejected" in d:
        return [Comparison(p.prompt, p.chosen, p.rejected, rec, labelled=True) for p in parse_preference(rec, problems)]
    if "response_a" not in d and "response_b" not in d:
        problems.append(rec.problem(None, "missing field: expected response_a and response_b, completions, or "
                                          "chosen and rejected"))
        return []
    if not _replies_checked(rec, [(n, d.get(n)) for n in ("response_a", "response_b")], problems):
        return []
    return [] if d["response_a"] == d["response_b"] else [Comparison(d["prompt"], d["response_a"],
                                                                     d["response_b"], rec)]


def read_comparisons(cfg: Config) -> list[Comparison]:
    problems: list[str] = []
    out = []
    for rec in read_records(cfg.data, config=cfg.data_config, seed=cfg.seed):
        out += parse_comparisons(rec, problems, cfg.pairs_per_prompt, cfg.seed)
    if problems:
        raise InputError(problems)
    if not out:
        raise InputError(f"{cfg.data}: no comparisons (every record's replies are identical)")
    return out


# --------------------------------------------------------------------------------------------
# Asking the judge
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One comparison with its principle and the judge's chat in each order (``a`` shown first, second)."""

    comparison: Comparison
    principle: Principle
    chats: tuple[list, list]


def make_jobs(comparisons: list[Comparison], principles: list[Principle], seed: int) -> list[Job]:
    jobs = []
    for c in comparisons:
        p = seeded_principle(principles, seed, "ai-label", c.key)  # the comparison's content: resumes draw the same
        a, b = reply_text(c.a), reply_text(c.b)
        jobs.append(Job(c, p, (principle_pairwise_messages(c.prompt, a, b, p.preference),
                               principle_pairwise_messages(c.prompt, b, a, p.preference))))
    return jobs


def judge_label(cfg: Config) -> str:
    """How outputs and request keys name the judge, known before it is built (see backend_label)."""
    return endpoint_label(cfg.judge_url, cfg.judge_model) if cfg.judge_url else cfg.judge_model


class Asker(JournaledModel):
    """The judge's requests: first attempts and retries, keyed so that none is ever sent twice
    (the backend is built on the first request to send: a finished run loads no model)."""

    def __init__(self, journal: ReplyJournal, cfg: Config):
        super().__init__(journal, lambda: judge_backend(cfg), cfg.judge_temperature, cfg.judge_max_new_tokens,
                         cfg.top_logprobs)
        self.cfg = cfg
        self.label = judge_label(cfg)

    def key(self, chat: list, attempt: int) -> str:
        c = self.cfg
        return request_key(self.label, chat, c.judge_temperature, c.judge_max_new_tokens, c.top_logprobs, attempt)

    @staticmethod
    def retry_chat(chat: list, first_reply) -> list:
        return [*chat, {"role": "assistant", "content": first_reply.text}, {"role": "user", "content": FORMAT_REMINDER}]

    def ask(self, chats: list[list], attempt: int) -> None:
        self.send(chats, [self.key(chat, attempt) for chat in chats])

    def verdict(self, chat: list) -> tuple[Verdict, bool] | None:
        """The final verdict of one chat and whether it was retried; None while a reply is missing."""
        first_key = self.key(chat, 1)
        if first_key not in self.journal:
            return None
        first = self.journal.get(first_key)
        verdict = read_verdict(first)
        if verdict.letter is not None:
            return verdict, False
        retry_key = self.key(self.retry_chat(chat, first), 2)
        return (read_verdict(self.journal.get(retry_key)), True) if retry_key in self.journal else None

    def retries_needed(self, jobs: list[Job]) -> list[list]:
        out = []
        for chat in (chat for job in jobs for chat in job.chats):
            first_key = self.key(chat, 1)
            if first_key in self.journal and read_verdict(self.journal.get(first_key)).letter is None:
                out.append(self.retry_chat(chat, self.journal.get(first_key)))
        return out

    def run(self, jobs: list[Job]) -> None:
        """Ask everything not yet answered: both orders of every comparison, then the retries."""
        self.ask([chat for job in jobs for chat in job.chats], attempt=1)
        self.ask(self.retries_needed(jobs), attempt=2)


# --------------------------------------------------------------------------------------------
# Labels, rows and statistics
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Judged:
    """A comparison's two final verdicts (``a`` shown first, ``a`` shown second) and their combination."""

    job: Job
    verdicts: tuple[Verdict, Verdict]
    outcome: PairOutcome  # from a's side: win / loss / tie / invalid
    retried: int

    @property
    def p_a(self) -> float | None:
        return p_first_of_pair(*self.verdicts)


def collect(asker: Asker, jobs: list[Job]) -> tuple[list[Judged], int]:
    """The comparisons whose verdicts are all in the journal, and how many are still pending."""
    judged, pending = [], 0
    for job in jobs:
        got = [asker.verdict(chat) for chat in job.chats]
        if None in got:
            pending += 1
            continue
        (v1, r1), (v2, r2) = got
        judged.append(Judged(job, (v1, v2), combine_verdicts(v1.letter, v2.letter), r1 + r2))
    return judged, pending


def row_of(j: Judged, judge: str) -> dict | None:
    """The preferences.jsonl row of a judged comparison (None: unparsed, never written)."""
    c, outcome = j.job.comparison, j.outcome.outcome
    if outcome == "invalid":
        return None
    a_wins = outcome != "loss"  # a tie keeps the stored order (chosen = a)
    first, second = (v.letter for v in j.verdicts)
    p_a = j.p_a
    row = {"prompt": c.prompt,
           "chosen": c.a if a_wins else c.b,
           "rejected": c.b if a_wins else c.a,
           "principle": j.job.principle.name,
           "judge": judge,
           "verdicts": {"chosen_first": first if a_wins else second, "rejected_first": second if a_wins else first},
           "consistent": j.outcome.consistent,
           "p_chosen": None if p_a is None else round(p_a if a_wins else 1.0 - p_a, 6),
           "tie": outcome == "tie"}
    if c.labelled:
        row["label_agrees"] = None if outcome == "tie" else a_wins
    return row


def agreement(judged: list[Judged]) -> dict | None:
    """How the confident labels of re-labelled input agree with the input's labels (``a`` = chosen)."""
    labelled = [j for j in judged if j.job.comparison.labelled]
    if not labelled:
        return None
    decided = [j for j in labelled if j.outcome.outcome in ("win", "loss")]
    agree = sum(j.outcome.outcome == "win" for j in decided)
    soft = [j.p_a for j in labelled if j.p_a is not None]
    return {"labelled_pairs": len(labelled), "compared": len(decided), "agree": agree,
            "rate": agree / len(decided) if decided else None,
            "mean_p_input_chosen": sum(soft) / len(soft) if soft else None}


def statistics(judged: list[Judged], pending: int, written: int) -> dict:
    outcomes = Counter(j.outcome.outcome for j in judged)
    letters = Counter(v.letter for j in judged for v in j.verdicts if v.letter is not None)
    decided = letters["A"] + letters["B"]
    soft = [j.p_a for j in judged if j.p_a is not None]
    return {
        "pairs": len(judged) + pending,
        "labelled": outcomes["win"] + outcomes["loss"],
        "consistent": sum(j.outcome.consistent is True for j in judged),
        "position_inconsistent": sum(j.outcome.consistent is False for j in judged),
        "ties": sum(j.outcome.outcome == "tie" and j.outcome.consistent is True for j in judged),
        "unparsed": outcomes["invalid"],
        "retried_verdicts": sum(j.retried for j in judged),
        "pending": pending,
        "written": written,
        "soft_labels": len(soft),
        "principles": dict(sorted(Counter(j.job.principle.name for j in judged).items())),
        "position_bias": {"first": letters["A"], "second": letters["B"], "tie": letters["C"],
                          "first_share": letters["A"] / decided if decided else None},
        "agreement": agreement(judged),
    }


def write_outputs(out: Path, judged: list[Judged], pending: int, judge: str,
                  keep_ties: bool) -> tuple[list[dict], dict]:
    """preferences.jsonl and stats.json; returns their rows and statistics."""
    rows = [r for r in (row_of(j, judge) for j in judged) if r is not None and (keep_ties or not r["tie"])]
    write_jsonl(str(out / "preferences.jsonl"), rows)
    stats = statistics(judged, pending, len(rows))
    write_json(out / "stats.json", stats)
    return rows, stats


def summary_line(stats: dict, out: Path) -> str:
    share = stats["position_bias"]["first_share"]
    parts = [f"ai-label: {stats['pairs']} pairs, {stats['labelled']} labelled; held back: "
             f"{stats['position_inconsistent']} position-inconsistent, {stats['ties']} ties, "
             f"{stats['unparsed']} unparsed",
             "first-position share " + ("n/a" if share is None else f"{share:.2f}")]
    agree = stats["agreement"]
    if agree and agree["rate"] is not None:
        parts.append(f"agreement with the input labels {agree['rate']:.2f} ({agree['agree']}/{agree['compared']})")
    parts.append(f"{stats['written']} rows in {out / 'preferences.jsonl'}")
    return "; ".join(parts)


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Labelling:
    """What :func:`label_comparisons` made: the rows and statistics written, and the endpoint
    error that stopped it (None: every comparison was judged)."""

    rows: list[dict]
    stats: dict
    judge: str
    failure: BackendError | None


def label_comparisons(cfg: Config, comparisons: list[Comparison], principles: list[Principle]) -> Labelling:
    """Steps 1-5 for ``comparisons`` (from a file or made in memory): the judge asked for whatever
    ``cfg.output``'s journal lacks, and preferences.jsonl, stats.json and config.yaml written there.
    A KeyboardInterrupt is raised again after the outputs for what was judged are written."""
    jobs = make_jobs(comparisons, principles, cfg.seed)
    out = Path(cfg.output)
    save_config(cfg, out)
    asker = Asker(ReplyJournal(out / "requests.jsonl"), cfg)
    failure: BaseException | None = None
    try:
        asker.run(jobs)
    except (BackendError, KeyboardInterrupt) as e:
        failure = e
    finally:
        asker.close()
    judged, pending = collect(asker, jobs)
    rows, stats = write_outputs(out, judged, pending, asker.label, cfg.keep_ties)
    if isinstance(failure, KeyboardInterrupt):
        raise failure
    return Labelling(rows, stats, asker.label, failure)


def main(cfg: Config) -> int:
    validated(cfg)
    comparisons = read_comparisons(cfg)
    labelling = label_comparisons(cfg, comparisons, load_constitution(cfg.constitution))
    out, stats = Path(cfg.output), labelling.stats
    if labelling.failure is not None:
        print(f"error: {labelling.failure} ({stats['written']} pairs labelled before it are in "
              f"{out / 'preferences.jsonl'}; rerun the same command to continue)", file=sys.stderr)
        return 1
    print(summary_line(stats, out))
    return 0
