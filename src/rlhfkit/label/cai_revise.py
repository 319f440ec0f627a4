"""``rlhfkit cai-revise``: Constitutional AI's supervised phase (Bai et al. 2022, section 3).

    rlhfkit cai-revise --prompts builtin --model-url http://127.0.0.1:8000/v1 --model-name M \\
        --rounds 2 --output out/cai
    rlhfkit sft --data out/cai/sft.jsonl --output out/sl-cai

For each prompt the model answers; then, ``--rounds`` times, it is shown a critique request (a
principle sampled from the constitution, its ``critique`` text verbatim) and, after its
critique, the same principle's revision request (its ``revision`` text verbatim). Every
request carries the whole conversation so far, so round 2 critiques round 1's revision::

    user: PROMPT                          assistant: RESPONSE
    user: principle_1.critique            assistant: CRITIQUE_1
    user: principle_1.revision            assistant: REVISION_1
    user: principle_2.critique            assistant: CRITIQUE_2      (round 2)
    user: principle_2.revision            assistant: REVISION_2

The principle of (prompt i, round r) is drawn from ``--seed``, i and r
(:func:`rlhfkit.data.constitution.seeded_principle`). Requests go out one step at a time for
every prompt at once (all responses, then every round-1 critique, ...): each step is one batch
for a local model and ``--concurrency`` requests in flight for an endpoint.

Outputs in ``--output``:

* ``sft.jsonl``: one record per finished chain, ``{messages: [prompt..., {assistant: final
  revision}], chain: [{principle, critique, revision}, ...], initial_response, ...}`` plus the
  prompt record's other fields (``id``, ``category``). ``rlhfkit sft`` trains on it as it is.
* ``requests.jsonl``: every reply as it arrived (:class:`rlhfkit.models.backends.ReplyJournal`);
  rerunning the same command continues and sends no request twice.
* ``stats.json``, ``config.yaml``.

A revision that opens with a label such as ``Revision:`` or ``**Revised response:**`` has that
label removed (only at the very start, only these labels, and only when text follows); nothing
else of the model's text is changed. A response or revision that is empty ends its chain, which
is counted in ``stats.json`` and left out of ``sft.jsonl``.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rlhfkit.config import DATA_CONFIG_HELP, arg, check_data_flag, save_config, validated
from rlhfkit.data.constitution import Principle, builtin_file, load_constitution, seeded_principle
from rlhfkit.models.backends import (
    BackendError,
    Message,
    ModelOptions,
    Reply,
    ReplyJournal,
    backend_label,
    journaled_replies,
    model_backend,
    request_key,
)

BUILTIN_PROMPTS = "red_team.jsonl"
# A label the model may put before its rewrite; removed only at the very start of a revision.
REVISION_LABEL = re.compile(r"\A\s*(?:\*\*|__)?(?:revision|revised response|revised answer|rewritten response)"
                            r"(?:\*\*|__)?\s*:\s*(?:\*\*|__)?\s*", re.IGNORECASE)

Fetch = Callable[[list[list[Message]]], Sequence[Reply | None]]


@dataclass
class Config(ModelOptions):
    """Constitutional AI's supervised phase: critique and revise responses against principles."""

    prompts: str = arg("builtin", "Prompts to answer and revise: `builtin` (40 red-team prompts written for "
                       "rlhfkit over 10 harm categories, plus 6 benign look-alikes) or records with `prompt` or "
                       "`messages` in a file, a Hugging Face dataset id or a mixture (docs/data.md).")
    data_config: str = arg("", DATA_CONFIG_HELP)
    constitution: str = arg("builtin", "Principles: `builtin`, or a JSONL/YAML file of {name, critique, revision, "
                            "preference} (docs/ai_feedback.md).")
    output: str = arg("", "Output folder: sft.jsonl, stats.json, config.yaml, requests.jsonl (the reply journal: "
                      "rerun the same command to continue).")
    rounds: int = arg(1, "Critique-revision rounds per prompt (each with its own sampled principle).")
    temperature: float = arg(0.7, "Sampling temperature of every request (0: greedy).")
    max_new_tokens: int = arg(256, "Maximum tokens of each reply (response, critique or revision).")
    seed: int = arg(42, "Seed of the principle drawn for each prompt and round (and of local sampling).")

    def validate(self) -> list[str]:
        problems = self.model_problems()
        if self.prompts != "builtin":
            problems += check_data_flag("prompts", self.prompts)
        if not self.constitution:
            problems.append("--constitution is required (a JSONL or YAML file, or `builtin`)")
        if not self.output:
            problems.append("--output is required")
        if self.rounds < 1:
            problems.append(f"--rounds must be >= 1 (got {self.rounds})")
        if self.max_new_tokens < 1:
            problems.append(f"--max-new-tokens must be >= 1 (got {self.max_new_tokens})")
        if self.temperature < 0:
            problems.append(f"--temperature must be >= 0 (got {self.temperature})")
        return problems


def strip_revision_label(text: str) -> tuple[str, bool]:
    """``text`` without a leading ``Revision:``-style label (and surrounding blanks); whether one was removed."""
    match = REVISION_LABEL.match(text)
    if match and text[match.end():].strip():
        return text[match.end():].strip(), True
    return text.strip(), False


@dataclass
class Chain:
    """One prompt's conversation: its response, then a critique and a revision per round.

    Step 0 is the response; step ``2r + 1`` the critique of round r, step ``2r + 2`` its revision.
    """

    prompt: list[Message]
    extra: dict                       # the prompt record's other fields (id, category, ...)
    principles: list[Principle]       # one per round
    conversation: list[Message] = field(default_factory=list)
    initial: str = ""
    rounds: list[dict] = field(default_factory=list)  # {principle, critique, revision}
    steps: int = 0                    # replies taken
    labels_removed: int = 0
    stopped: str = ""                 # "empty": the model gave an empty response; "waiting": no reply yet

    @property
    def total_steps(self) -> int:
        return 1 + 2 * len(self.principles)

    @property
    def complete(self) -> bool:
        return self.steps == self.total_steps and not self.stopped

    def request(self) -> list[Message]:
        """The messages of the next request: the conversation so far and the next user turn."""
        if self.steps == 0:
            return list(self.prompt)
        principle = self.principles[(self.steps - 1) // 2]
        ask = principle.critique if self.steps % 2 == 1 else principle.revision
        return [*self.conversation, {"role": "user", "content": ask}]

    def take(self, text: str) -> None:
        """Record the reply to :meth:`request`."""
        self.conversation = [*self.request(), {"role": "assistant", "content": text}]
        if self.steps == 0:
            self.initial = text.strip()
            answer = self.initial
        elif self.steps % 2 == 1:  # a critique (an empty one does not end the chain)
            self.rounds.append({"principle": self.principles[(self.steps - 1) // 2].name, "critique": text.strip()})
            answer = None
        else:
            answer, removed = strip_revision_label(text)
            self.rounds[-1]["revision"] = answer
            self.labels_removed += removed
        self.steps += 1
        if answer == "":
            self.stopped = "empty"

    def record(self) -> dict:
        """The ``sft.jsonl`` record of a complete chain."""
        final = self.rounds[-1]["revision"]
        return {**self.extra, "messages": [*self.prompt, {"role": "assistant", "content": final}],
                "chain": self.rounds, "initial_response": self.initial}


def load_chains(cfg: Config, principles: Sequence[Principle]) -> list[Chain]:
    """A fresh chain per prompt, its principles drawn from the seed, the prompt's index and the round."""
    from rlhfkit.data.chat import as_messages
    from rlhfkit.data.schema import load_prompts

    spec = str(builtin_file(BUILTIN_PROMPTS)) if cfg.prompts == "builtin" else cfg.prompts
    examples = load_prompts(spec, config=cfg.data_config, seed=cfg.seed)
    return [Chain(as_messages(ex.prompt), dict(ex.extra),
                  [seeded_principle(principles, cfg.seed, i, r) for r in range(cfg.rounds)])
            for i, ex in enumerate(examples)]


def run_chains(chains: Sequence[Chain], fetch: Fetch) -> None:
    """Advance every chain one step at a time; a chain whose reply ``fetch`` does not give waits."""
    for _ in range(max((c.total_steps for c in chains), default=0)):
        live = [c for c in chains if not c.stopped and c.steps < c.total_steps]
        if not live:
            return
        for chain, reply in zip(live, fetch([c.request() for c in live])):
            if reply is None:
                chain.stopped = "waiting"
            else:
                chain.take(reply.text)


def write_outputs(out: Path, chains: Sequence[Chain], cfg: Config, model: str, answered: int,
                  journal: ReplyJournal) -> dict:
    """``sft.jsonl`` (the complete chains, in prompt order) and ``stats.json``; returns the stats."""
    from rlhfkit.data.io import write_jsonl
    from rlhfkit.evaluation.report import write_json

    done = [c for c in chains if c.complete]
    write_jsonl(out / "sft.jsonl", (c.record() for c in done))
    principles = Counter(step["principle"] for c in done for step in c.rounds)
    stats = {
        "model": model, "constitution": cfg.constitution, "prompts": len(chains), "rounds": cfg.rounds,
        "complete": len(done), "empty_reply": sum(c.stopped == "empty" for c in chains),
        "unfinished": sum(not c.complete and c.stopped != "empty" for c in chains),
        "requests": {"journal": len(journal), "sent_this_run": answered},
        "revision_labels_removed": sum(c.labels_removed for c in done),
        "principles": dict(sorted(principles.items())),
    }
    write_json(out / "stats.json", stats)
    return stats


def main(cfg: Config) -> int:
    validated(cfg)
    principles = load_constitution(cfg.constitution)
    chains = load_chains(cfg, principles)  # bad prompts: exit 2 before any model is loaded
    out = Path(cfg.output)
    save_config(cfg, out)
    try:
        backend = model_backend(cfg, role="model")
    except BackendError as e:  # a local model that cannot be loaded
        print(f"error: {e}", file=sys.stderr)
        return 1
    model = backend_label(backend)
    journal = ReplyJournal(out / "requests.jsonl")
    before = len(journal)

    def keys(conversations: list[list[Message]]) -> list[str]:
        return [request_key(model, c, cfg.temperature, cfg.max_new_tokens, 0) for c in conversations]

    failure: BaseException | None = None
    try:
        run_chains(chains, lambda convs: journaled_replies(backend, convs, keys(convs), journal, cfg.temperature,
                                                           cfg.max_new_tokens))
    except (BackendError, KeyboardInterrupt) as e:
        failure = e
    finally:
        if hasattr(backend, "close"):
            backend.close()
    # The outputs are rebuilt from the journal alone: after an interruption they hold every chain
    # finished before it, and they are the same whether a run went through at once or in pieces.
    chains = load_chains(cfg, principles)
    run_chains(chains, lambda convs: [journal.get(k) if k in journal else None for k in keys(convs)])
    stats = write_outputs(out, chains, cfg, model, len(journal) - before, journal)
    if isinstance(failure, KeyboardInterrupt):
        raise failure
    if failure is not None:
        print(f"error: {failure} ({stats['complete']} of {stats['prompts']} chains finished before it are in "
              f"{out / 'sft.jsonl'}; rerun the same command to continue)", file=sys.stderr)
        return 1
    print(f"cai-revise: {stats['complete']}/{stats['prompts']} prompts revised over {cfg.rounds} round(s) "
          f"({stats['requests']['sent_this_run']} requests sent, {stats['empty_reply']} ended by an empty reply) "
          f"-> {out / 'sft.jsonl'}", flush=True)
    return 0
