"""``rlhfkit self-instruct``: new instructions bootstrapped from a pool of seed tasks (Wang et al. 2022).

    rlhfkit self-instruct --model smollm2-135m --output si/ --num-instructions 20
    rlhfkit self-instruct --model-url http://127.0.0.1:8000/v1 --model-name M --seed-tasks tasks.jsonl --output si/

The pool starts as the seed tasks' instructions (``--seed-tasks builtin``: 26 tasks written for this
project, ``data/builtin/seed_tasks.jsonl``). Each round:

1. **Prompt** (:func:`proposal_prompt`): ``--prompts-per-round`` requests, each showing
   ``--examples-per-prompt`` instructions sampled from the pool (up to ``--generated-examples`` of
   them model-generated, the rest seed tasks; the paper's 8 = 6 + 2) as a numbered list, asking for
   ``--instructions-per-prompt`` more.
2. **Propose**: the numbered items of each reply are the candidates (:func:`parse_numbered_list`;
   a reply without any is counted as unparseable).
3. **Filter** (:func:`drop_reason`, then :class:`InstructionPool`), each candidate in turn against the
   pool as it stands, so that two near-identical candidates of one round are not both kept:
   ``length`` (outside ``--min-words``..``--max-words`` words), ``keyword`` (the paper's list:
   image, picture, graph, file, map, draw, plot, go to, video, audio, music, flowchart, diagram — a
   text model cannot do those), ``format`` (starts with punctuation or a non-ASCII character, the
   paper's test for non-English), ``duplicate`` (the same words as a pool instruction) and ``rouge``
   (ROUGE-L F1 against some pool instruction >= ``--rouge-threshold``, 0.7). A kept candidate joins
   the pool at once.
4. **Respond**: one request per kept instruction; the instruction and its reply become an SFT record.

It stops when ``--num-instructions`` are kept (the candidates left over are counted as ``unused``) or
after ``--max-rounds``. Every request goes through the reply journal (``requests.jsonl``), keyed by
the request itself; the prompts of a round are a pure function of the seed, the round and the pool,
and the pool of the journal's replies, so a rerun with the same ``--output`` replays what is done and
sends only what is missing.

Outputs in ``--output``: ``sft.jsonl`` (``{messages: [user, assistant]}``), ``candidates.jsonl``
(every candidate: its round, ``status`` = kept or the filter that dropped it, and its nearest pool
instruction with the ROUGE-L score), ``stats.json``, ``config.yaml``, ``requests.jsonl``.
"""

from __future__ import annotations

import random
import re
import string
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rlhfkit.config import arg, check_data_flag
from rlhfkit.data.constitution import builtin_file
from rlhfkit.models.backends import ModelOptions

# Self-Instruct's blacklist (bootstrap_instructions.py): tasks a language model cannot do in text.
BLOCKED_WORDS = ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps",
                 "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram")
BLOCKED = re.compile(r"\b(" + "|".join(re.escape(w) for w in BLOCKED_WORDS) + r")\b", re.IGNORECASE)
FILTERS = ("length", "keyword", "format", "duplicate", "rouge")  # in the order they are applied
# "3. ...", "3) ...", "Task 3: ...", and bullets ("- ...", "* ...", "• ..."), which small models write instead
LIST_ITEM = re.compile(r"^\s*(?:(?:task\s*)?\d+\s*[.):]|[-*\u2022])\s*(.*)$", re.IGNORECASE)


@dataclass
class Config(ModelOptions):
    """Self-instruct: synthetic instructions and responses bootstrapped from seed tasks by a model."""

    seed_tasks: str = arg("builtin", "Seed tasks: `builtin` (26 tasks written for this project) or a file of "
                          "records {instruction, input?, output}.")
    output: str = arg("", "Output folder: sft.jsonl, candidates.jsonl, stats.json, config.yaml, requests.jsonl "
                      "(rerun with the same folder to resume).")
    num_instructions: int = arg(20, "Stop when this many new instructions are kept.")
    max_rounds: int = arg(10, "Stop after this many rounds even if fewer were kept.")
    prompts_per_round: int = arg(4, "Proposal requests per round.")
    examples_per_prompt: int = arg(8, "Pool instructions shown in each proposal request (the paper: 8).")
    generated_examples: int = arg(2, "Of those, at most this many model-generated ones once there are some "
                                  "(the paper: 2); the rest are seed tasks.")
    instructions_per_prompt: int = arg(8, "New instructions each proposal request asks for.")
    rouge_threshold: float = arg(0.7, "Drop a candidate whose ROUGE-L F1 against any pool instruction is at "
                                 "least this.")
    min_words: int = arg(3, "Drop candidates with fewer words.")
    max_words: int = arg(150, "Drop candidates with more words.")
    temperature: float = arg(0.7, "Sampling temperature of the proposal requests (the paper: 0.7).")
    max_new_tokens: int = arg(384, "Maximum tokens of a proposal reply.")
    response_temperature: float = arg(0.0, "Temperature of the response requests (0: greedy).")
    response_max_new_tokens: int = arg(256, "Maximum tokens of a response.")
    include_seed_tasks: bool = arg(False, "Also write the seed tasks (instruction and input as the user turn, "
                                   "output as the reply) to sft.jsonl.")
    seed: int = arg(42, "Random seed: which pool instructions each prompt shows, and local sampling.")

    def validate(self) -> list[str]:
        problems = self.model_problems()
        if not self.output:
            problems.append("--output is required")
        if self.seed_tasks != "builtin":
            problems += check_data_flag("seed_tasks", self.seed_tasks)
        for name in ("num_instructions", "max_rounds", "prompts_per_round", "examples_per_prompt",
                     "instructions_per_prompt", "min_words", "max_new_tokens", "response_max_new_tokens"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(self, name)})")
        if not 0 <= self.generated_examples <= self.examples_per_prompt:
            problems.append("--generated-examples must be in [0, --examples-per-prompt]")
        if self.max_words < self.min_words:
            problems.append("--max-words must be >= --min-words")
        if not 0 < self.rouge_threshold <= 1:
            problems.append("--rouge-threshold must be in (0, 1]")
        if self.temperature < 0 or self.response_temperature < 0:
            problems.append("--temperature and --response-temperature must be >= 0")
        return problems


# --------------------------------------------------------------------------------------------
# Seed tasks
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SeedTask:
    instruction: str
    input: str
    output: str

    def user_turn(self) -> str:
        return f"{self.instruction}\n\n{self.input}" if self.input else self.instruction


def load_seed_tasks(spec: str) -> list[SeedTask]:
    """The seed tasks of ``builtin`` or a file; InputError names file:line:field of every problem."""
    from rlhfkit.data.io import read_records
    from rlhfkit.errors import InputError

    records = read_records(str(builtin_file("seed_tasks.jsonl")) if spec == "builtin" else spec)
    tasks, problems = [], []
    for rec in records:
        values = {}
        for name, required in (("instruction", True), ("input", False), ("output", True)):
            value = rec.data.get(name)
            if value is None and not required:
                value = ""
            if not isinstance(value, str) or (required and not value.strip()):
                problems.append(rec.problem(name, "missing" if value is None else "expected a non-empty string"))
            values[name] = value if isinstance(value, str) else ""
        tasks.append(SeedTask(values["instruction"].strip(), values["input"].strip(), values["output"].strip()))
    if problems:
        raise InputError(problems)
    return tasks


# --------------------------------------------------------------------------------------------
# Prompts, parsing, filters
# --------------------------------------------------------------------------------------------


def proposal_prompt(examples: list[str], wanted: int) -> list[dict]:
    """The request for ``wanted`` new instructions, showing ``examples`` as a numbered list."""
    shown = "\n".join(f"{i}. {text}" for i, text in enumerate(examples, start=1))
    ask = (f"Come up with a series of tasks that a helpful assistant could be asked to do. Here are some "
           f"examples:\n\n{shown}\n\nWrite {wanted} new tasks as a numbered list continuing from "
           f"{len(examples) + 1}. Make them different from the examples and from each other: different verbs, "
           f"topics and kinds of task. Each task is one instruction in English that can be answered in text.")
    return [{"role": "user", "content": ask}]


def parse_numbered_list(text: str) -> list[str]:
    """The items of a numbered list (``1. ...``, ``2) ...``, ``Task 3: ...``; bullets too) in a reply,
    each with its continuation lines up to the next item or blank line, whitespace collapsed; empty
    items dropped."""
    items: list[list[str]] = []
    open_item = False
    for line in text.splitlines():
        match = LIST_ITEM.match(line)
        if match:
            items.append([match.group(1)])
            open_item = True
        elif not line.strip():
            open_item = False
        elif open_item:
            items[-1].append(line)
    joined = (" ".join(" ".join(parts).split()) for parts in items)
    return [item for item in joined if item]


def drop_reason(instruction: str, min_words: int, max_words: int) -> str | None:
    """The first of the cheap filters a candidate fails (length, keyword, format), or None."""
    if not min_words <= len(instruction.split()) <= max_words:
        return "length"
    if BLOCKED.search(instruction):
        return "keyword"
    if instruction[0] in string.punctuation or not instruction[0].isascii():
        return "format"
    return None


class _TokenCache:
    """rouge_score's default tokenizer, remembering each text's tokens: the pool is tokenised once."""

    def __init__(self):
        from rouge_score import tokenizers

        self._tokenizer = tokenizers.DefaultTokenizer(use_stemmer=False)
        self._tokens: dict[str, list[str]] = {}

    def tokenize(self, text: str) -> list[str]:
        tokens = self._tokens.get(text)
        if tokens is None:
            tokens = self._tokens[text] = self._tokenizer.tokenize(text)
        return tokens


class InstructionPool:
    """The instructions a candidate is compared against: the seed tasks', then every kept one.

    ROUGE-L F1 is the paper's measure (``rouge_score``, no stemming). A longest common subsequence
    per pool instruction would make each candidate cost O(pool) LCS computations; :meth:`nearest`
    finds the same maximum while computing few of them (docs/ai_feedback.md has the measured cost).
    """

    def __init__(self, seed_instructions: list[str]):
        from rouge_score import rouge_scorer

        self.seed = list(seed_instructions)
        self.generated: list[str] = []
        self._normalised = {self.normalise(t) for t in self.seed}
        self._tokens = _TokenCache()
        self._scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False, tokenizer=self._tokens)
        self._counts = {t: Counter(self._tokens.tokenize(t)) for t in self.seed}

    @property
    def instructions(self) -> list[str]:
        return self.seed + self.generated

    @staticmethod
    def normalise(text: str) -> str:
        return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())

    def is_duplicate(self, text: str) -> bool:
        return self.normalise(text) in self._normalised

    def nearest(self, text: str) -> tuple[float, str]:
        """The highest ROUGE-L F1 of ``text`` against a pool instruction, and that instruction.

        Exact, and cheap: a common subsequence uses each word at most as often as both texts have
        it, so F1 = 2 LCS / (m + n) <= 2 |common words| / (m + n). Pool instructions are scored in
        decreasing order of that bound (a word count per pair), stopping once the bound cannot beat
        the best score found.
        """
        counts = Counter(self._tokens.tokenize(text))
        length = sum(counts.values())
        bounds = []
        for other in self.instructions:
            other_counts = self._counts[other]
            total = length + sum(other_counts.values())
            common = sum(min(c, other_counts.get(word, 0)) for word, c in counts.items())
            bounds.append((2 * common / total if total else 0.0, other))
        bounds.sort(key=lambda pair: -pair[0])  # stable: ties in pool order
        best, nearest = 0.0, ""
        for bound, other in bounds:
            if bound <= best:
                break
            score = self._scorer.score(other, text)["rougeL"].fmeasure
            if score > best:
                best, nearest = score, other
        return best, nearest

    def add(self, text: str) -> None:
        self.generated.append(text)
        self._normalised.add(self.normalise(text))
        self._counts[text] = Counter(self._tokens.tokenize(text))


@dataclass
class Candidate:
    instruction: str
    round: int
    status: str                 # "kept", a filter in FILTERS, or "unused" (the target was reached first)
    rouge_l: float | None = None  # against its nearest pool instruction (None: dropped before ROUGE)
    nearest: str | None = None


def judge_candidate(text: str, round_number: int, pool: InstructionPool, cfg: Config) -> Candidate:
    """The candidate with its status; a kept one is added to ``pool``."""
    reason = drop_reason(text, cfg.min_words, cfg.max_words)
    if reason is None and pool.is_duplicate(text):
        reason = "duplicate"
    if reason is not None:
        return Candidate(text, round_number, reason)
    score, nearest = pool.nearest(text)
    if score >= cfg.rouge_threshold:
        return Candidate(text, round_number, "rouge", round(score, 4), nearest)
    pool.add(text)
    return Candidate(text, round_number, "kept", round(score, 4), nearest)


# --------------------------------------------------------------------------------------------
# The rounds
# --------------------------------------------------------------------------------------------


@dataclass
class Progress:
    """Everything a run has produced so far (written out after each round and on an error)."""

    candidates: list[Candidate] = field(default_factory=list)
    records: list[dict] = field(default_factory=list)   # the SFT records of kept instructions
    unparseable_replies: int = 0
    empty_responses: int = 0
    rounds: int = 0

    @property
    def kept(self) -> int:
        return sum(c.status == "kept" for c in self.candidates)

    def stats(self) -> dict:
        return {"proposed": len(self.candidates), "kept": self.kept,
                "dropped": {f: sum(c.status == f for c in self.candidates) for f in FILTERS},
                "unused": sum(c.status == "unused" for c in self.candidates),
                "unparseable_replies": self.unparseable_replies, "empty_responses": self.empty_responses,
                "sft_records": len(self.records), "rounds": self.rounds}


def sample_examples(pool: InstructionPool, cfg: Config, rng: random.Random) -> list[str]:
    """``examples_per_prompt`` pool instructions: up to ``generated_examples`` model-generated, the rest
    seed tasks (fewer when the pool is smaller), in a random order."""
    generated = rng.sample(pool.generated, min(cfg.generated_examples, len(pool.generated)))
    seeds = rng.sample(pool.seed, min(cfg.examples_per_prompt - len(generated), len(pool.seed)))
    examples = generated + seeds
    rng.shuffle(examples)
    return examples


def propose(backend, journal, label: str, pool: InstructionPool, cfg: Config, round_number: int) -> list[str]:
    """One round's proposal replies (the round and slot are in the key: a prompt drawn twice is two
    requests)."""
    from rlhfkit.models.backends import journaled_replies, request_key

    rng = random.Random(f"rlhfkit-self-instruct:{cfg.seed}:{round_number}")
    prompts = [proposal_prompt(sample_examples(pool, cfg, rng), cfg.instructions_per_prompt)
               for _ in range(cfg.prompts_per_round)]
    keys = [request_key("self-instruct:propose", label, p, cfg.temperature, cfg.max_new_tokens, round_number, slot)
            for slot, p in enumerate(prompts)]
    return [r.text for r in journaled_replies(backend, prompts, keys, journal, cfg.temperature, cfg.max_new_tokens)]


def respond(backend, journal, label: str, instructions: list[str], cfg: Config, progress: Progress) -> None:
    """Responses to the kept instructions, appended to ``progress.records`` (empty ones counted).
    Each arrives in the journal first, so an error loses none that came back."""
    from rlhfkit.models.backends import journaled_replies, request_key

    chats = [[{"role": "user", "content": text}] for text in instructions]
    keys = [request_key("self-instruct:respond", label, c, cfg.response_temperature, cfg.response_max_new_tokens)
            for c in chats]
    try:
        replies = journaled_replies(backend, chats, keys, journal, cfg.response_temperature,
                                    cfg.response_max_new_tokens)
    except BaseException:  # keep the responses that did arrive, then let the error end the run
        replies = [journal.get(k) if k in journal else None for k in keys]
        _add_records(chats, replies, progress)
        raise
    _add_records(chats, replies, progress)


def _add_records(chats: list[list[dict]], replies: list, progress: Progress) -> None:
    for chat, reply in zip(chats, replies):
        if reply is None:
            continue
        if not reply.text.strip():
            progress.empty_responses += 1
            continue
        progress.records.append(sft_record(chat[0]["content"], reply.text.strip()))


def sft_record(instruction: str, response: str) -> dict:
    return {"messages": [{"role": "user", "content": instruction}, {"role": "assistant", "content": response}]}


def bootstrap(backend, journal, seeds: list[SeedTask], cfg: Config, progress: Progress,
              on_round=lambda progress: None) -> None:
    """The rounds, until ``num_instructions`` are kept or ``max_rounds`` have run."""
    from rlhfkit.models.backends import backend_label

    label = backend_label(backend)
    pool = InstructionPool([t.instruction for t in seeds])
    for round_number in range(1, cfg.max_rounds + 1):
        if progress.kept >= cfg.num_instructions:
            break
        kept = []
        for reply in propose(backend, journal, label, pool, cfg, round_number):
            items = parse_numbered_list(reply)
            progress.unparseable_replies += not items
            for text in items:
                if progress.kept >= cfg.num_instructions:
                    progress.candidates.append(Candidate(text, round_number, "unused"))
                    continue
                progress.candidates.append(judge_candidate(text, round_number, pool, cfg))
                if progress.candidates[-1].status == "kept":
                    kept.append(text)
        progress.rounds = round_number
        respond(backend, journal, label, kept, cfg, progress)
        on_round(progress)


def write_outputs(out: Path, progress: Progress, seed_records: list[dict], seconds: float) -> dict:
    from rlhfkit.data.io import write_jsonl
    from rlhfkit.evaluation.report import write_json

    write_jsonl(out / "sft.jsonl", seed_records + progress.records)
    write_jsonl(out / "candidates.jsonl", (asdict(c) for c in progress.candidates))
    stats = {**progress.stats(), "seed_tasks_in_sft": len(seed_records), "seconds": round(seconds, 1)}
    write_json(out / "stats.json", stats)
    return stats


def summary_line(stats: dict, out: Path) -> str:
    dropped = ", ".join(f"{name} {count}" for name, count in stats["dropped"].items())
    return (f"self-instruct: kept {stats['kept']} of {stats['proposed']} proposed instructions in {stats['rounds']} "
            f"rounds (dropped: {dropped}; unused {stats['unused']}; unparseable replies "
            f"{stats['unparseable_replies']}); {stats['sft_records']} responses in {stats['seconds']:.1f} s "
            f"-> {out / 'sft.jsonl'}")


def main(cfg: Config) -> int:
    from rlhfkit.config import save_config, validated
    from rlhfkit.models.backends import BackendError, ReplyJournal, model_backend

    validated(cfg)
    seeds = load_seed_tasks(cfg.seed_tasks)  # a bad seed file: exit 2 before any model is loaded
    out = Path(cfg.output)
    save_config(cfg, out)
    seed_records = [sft_record(t.user_turn(), t.output) for t in seeds] if cfg.include_seed_tasks else []
    backend = model_backend(cfg, role="model")
    journal = ReplyJournal(out / "requests.jsonl")
    progress, t0 = Progress(), time.time()
    write = lambda p: write_outputs(out, p, seed_records, time.time() - t0)  # noqa: E731
    failure = None
    try:
        bootstrap(backend, journal, seeds, cfg, progress, on_round=write)
    except BackendError as e:
        failure = e
    finally:  # an endpoint error or an interruption: what arrived so far stays in the outputs
        stats = write(progress)
        backend.close()
    if failure is not None:
        print(f"error: {failure} ({len(progress.records)} answered instruction(s) so far are in "
              f"{out / 'sft.jsonl'}; rerun the same command to continue)", file=sys.stderr)
        return 1
    line = summary_line(stats, out)
    if stats["kept"] < cfg.num_instructions:
        line += f" (fewer than --num-instructions {cfg.num_instructions} after --max-rounds {cfg.max_rounds})"
    print(line, flush=True)
    return 0
