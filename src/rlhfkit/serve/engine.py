"""The batching engine: one worker thread owns the model and answers jobs from a queue.

A *job* is one API request after validation: token ids for each of its prompts (one for a chat
request; one or more for a completions request), :class:`~rlhfkit.generation.decoding.SamplingParams`
and where to send its results. The worker takes the oldest waiting job, waits up to
``batch_wait_ms`` for more, and runs every waiting job that is *compatible* with it (same
temperature, top-p, top-k, min-p and repetition penalty; no seed) in one
:func:`~rlhfkit.generation.decoding.generate_ids` call, up to ``max_batch_size`` sequences.

Different ``max_tokens``, ``n`` and ``stop`` values share a call: a per-row tracker (a
``transformers.StoppingCriteria`` called once per decoding step) ends each row at its own token
limit, at EOS or when its text contains one of its stop strings, and streams the row's text as
it grows. A finished row is padded by ``generate`` until the longest row ends; its request is
answered as soon as all of its rows have finished, not when the whole batch has.

A job that asks for log-probs (``logprobs``) gets them after its generation, from one
teacher-forced forward over each prompt and its completion (:func:`rlhfkit.models.token_scores.score_tokens`,
batched like the generation): the scores of the same model, read by the one per-token log-prob
primitive, rather than scores kept from inside ``generate``. A job with ``generate=False`` (``max_tokens``
0 with ``echo``) only scores its prompts; such jobs batch with each other.

A request with a ``seed`` runs alone, so its samples depend only on the request (the global
torch RNG is seeded by ``generate_ids`` and re-randomised afterwards). Greedy requests run one
row per prompt and copy it to their ``n`` choices.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from transformers import StoppingCriteria

from rlhfkit.generation.decoding import Completion, SamplingParams, apply_stop, describe_response, generate_ids
from rlhfkit.models.token_scores import TokenScores, score_tokens

log = logging.getLogger("rlhfkit.serve")

_STOP = object()

# Events a job sends to its sink (called from the worker thread):
#   ("delta", choice_index, text)          streaming jobs only: new text of one choice
#   ("finish", choice_index, Completion)   streaming jobs only: one choice is complete
#   ("done", [Completion, ...])            every choice is complete (in choice order)
#   ("error", status, message, type)       the job failed; nothing else follows
Event = tuple


class EngineClosed(RuntimeError):
    """The engine is stopping or stopped: no new jobs."""


@dataclass(frozen=True)
class LogprobsRequest:
    """Per-token log-probs a job asks for."""

    top: int            # most likely alternatives reported at each position (0: only the chosen token)
    echo: bool          # score the prompt's tokens too (its first token has none: nothing predicts it)


@dataclass(eq=False)
class Job:
    """One request: ``len(prompts) * params.n`` choices, choice ``i * n + j`` for prompt ``i``."""

    prompts: list[list[int]]
    params: SamplingParams
    sink: Callable[[Event], Any]
    stream: bool = False
    strip: bool = True          # chat: strip whitespace like generate_chat; completions: raw text
    cancelled: bool = False     # set by the HTTP side when the client goes away
    logprobs: LogprobsRequest | None = None
    generate: bool = True       # False: only score the prompts (no completion tokens)
    completions: list[Completion | None] = field(default_factory=list)
    # per choice, when ``logprobs`` was asked: the scored tokens of prompt (with echo) + completion
    scores: list[TokenScores] | None = None
    generated: bool = False     # every choice has its completion (log-probs may still be missing)
    finished: bool = False
    emitted: bool = False       # some event went out (then the job cannot be run again)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self):
        self.completions = [None] * self.num_choices
        self._remaining = self.num_choices

    @property
    def num_choices(self) -> int:
        return len(self.prompts) * self.params.n

    @property
    def greedy(self) -> bool:
        return self.params.strategy == "greedy"

    @property
    def num_rows(self) -> int:
        """Sequences this job adds to a ``generate`` call."""
        return len(self.prompts) * (1 if self.greedy or not self.generate else self.params.n)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def longest_prompt(self) -> int:
        return max(len(p) for p in self.prompts)

    @property
    def key(self) -> tuple | None:
        """Jobs with equal keys can share a ``generate`` call; None: the job runs alone."""
        p = self.params
        if not self.generate:
            return ("score",)
        if p.seed is not None:
            return None
        if self.greedy:
            return ("greedy", p.repetition_penalty)
        return ("sample", p.temperature, p.top_p, p.top_k, p.min_p, p.repetition_penalty)

    def emit(self, event: Event) -> None:
        self.emitted = True
        try:
            self.sink(event)
        except Exception:  # the receiving side is gone (event loop closed): stop generating
            self.cancelled = True

    def complete(self, choices: list[int], completion: Completion) -> None:
        with self._lock:
            if self.finished:
                return
            for c in choices:
                self.completions[c] = completion
                if self.stream:
                    self.emit(("finish", c, completion))
            self._remaining -= len(choices)
            if self._remaining <= 0:
                self.generated = True
                if self.logprobs is None:  # else the engine scores the job, then delivers it
                    self.finished = True
                    self.emit(("done", list(self.completions)))

    def deliver(self, scores: list[TokenScores]) -> None:
        """Attach each choice's log-probs and answer the job."""
        with self._lock:
            if self.finished:
                return
            self.scores, self.finished = scores, True
            self.emit(("done", list(self.completions)))

    def reset(self) -> None:
        """Forget partial results before running the job again (only if nothing went out)."""
        with self._lock:
            assert not self.emitted
            self.completions = [None] * self.num_choices
            self.generated = False
            self._remaining = self.num_choices

    def fail(self, status: int, message: str, type: str = "server_error") -> None:
        with self._lock:
            if self.finished:
                return
            self.finished = True
            self.emit(("error", status, message, type))


def stream_safe_text(text: str, stop: list[str], strip: bool) -> str:
    """The part of a growing response that can be sent now without ever being taken back.

    Holds back an ending that could be the start of a stop string, replacement characters of an
    incomplete UTF-8 sequence (byte-level tokenizers), and, when the final text will be
    stripped, trailing whitespace. Text from a complete stop string on is never sent.
    """
    text = apply_stop(text, stop)
    hold = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    safe = text[:len(text) - hold].rstrip("\ufffd")
    return safe.strip() if strip else safe


class _Row:
    """One sequence of a ``generate`` call: one sample of one prompt of one job."""

    def __init__(self, job: Job, prompt: list[int], choices: list[int]):
        self.job = job
        self.prompt = prompt
        self.choices = choices
        self.max_new_tokens = job.params.max_new_tokens
        self.stop = [s for s in job.params.stop if s]
        self.tokens: list[int] = []
        self.sent = ""
        self.done = False

    def push(self, token: int, tokenizer) -> None:
        if self.job.cancelled or self.job.finished:
            self.done = True
            return
        self.tokens.append(token)
        if token == tokenizer.eos_token_id or len(self.tokens) >= self.max_new_tokens:
            self.finish(tokenizer)
            return
        if not (self.stop or self.job.stream):
            return
        text = tokenizer.decode(self.tokens, skip_special_tokens=True)
        if any(s in text for s in self.stop):
            self.finish(tokenizer)
        elif self.job.stream:
            self._send(stream_safe_text(text, self.stop, self.job.strip))

    def _send(self, safe: str) -> None:
        if len(safe) > len(self.sent) and safe.startswith(self.sent):
            delta, self.sent = safe[len(self.sent):], safe
            for c in self.choices:
                self.job.emit(("delta", c, delta))

    def finish(self, tokenizer) -> None:
        self.done = True
        if self.job.cancelled or self.job.finished:
            return
        completion = describe_response(tokenizer, self.tokens, self.max_new_tokens, self.stop, self.job.strip)
        if self.job.stream:
            if completion.text.startswith(self.sent):
                self._send(completion.text)
            else:  # a tokenizer whose decoding of a prefix is not a prefix: cannot be taken back
                log.warning("streamed text diverged from the final text; the final chunk is skipped")
        self.job.complete(self.choices, completion)


class _Tracker(StoppingCriteria):
    """Per-row bookkeeping inside one batched ``generate`` call (called after every step)."""

    def __init__(self, rows: list[_Row], tokenizer, lock: threading.RLock):
        self.rows = rows
        self.tokenizer = tokenizer
        self.lock = lock

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        new = input_ids[:, -1].tolist()
        with self.lock:
            for row, token in zip(self.rows, new):
                if not row.done:
                    row.push(token, self.tokenizer)
        return torch.tensor([row.done for row in self.rows], dtype=torch.bool, device=input_ids.device)


class Engine:
    """Owns a model and its tokenizer; answers :class:`Job` objects from a background thread.

    ``tokenizer_lock`` must be held by any other thread that uses the tokenizer while the
    engine runs (a fast tokenizer must not be used from two threads at once).
    """

    def __init__(self, model, tokenizer, max_batch_size: int = 8, batch_wait_ms: float = 5.0,
                 context_length: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max(1, int(max_batch_size))
        self.batch_wait = max(0.0, float(batch_wait_ms)) / 1000.0
        self.context_length = context_length or model_context_length(model)
        self.tokenizer_lock = threading.RLock()
        self._queue: queue.Queue = queue.Queue()
        self._closed = False
        self._running = threading.Event()
        self._running.set()
        self._active: list[Job] = []
        self._stats_lock = threading.Lock()
        self._stats: dict[str, Any] = {
            "generate_calls": 0,        # generate() calls made
            "score_calls": 0,           # batches that only scored prompts (max_tokens 0 with echo)
            "batched_calls": 0,         # ... of which served more than one request
            "max_requests_per_call": 0,
            "calls_by_requests": {},    # number of requests in a call -> number of such calls
            "requests": 0,              # requests taken into a generate call
            "failed_calls": 0,
            "waiting": 0,               # requests submitted and not yet in a generate call
        }
        self._thread = threading.Thread(target=self._loop, name="rlhfkit-serve-engine", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- public
    def submit(self, job: Job) -> None:
        if self._closed:
            raise EngineClosed("the server is shutting down")
        with self._stats_lock:
            self._stats["waiting"] += 1
        self._queue.put(job)

    def stats(self) -> dict[str, Any]:
        with self._stats_lock:
            out = dict(self._stats)
            out["calls_by_requests"] = dict(out["calls_by_requests"])
            return out

    def pause(self) -> None:
        """Hold new ``generate`` calls (requests keep queueing) until :meth:`resume`."""
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    def stop(self, timeout: float = 30.0) -> None:
        """Refuse new jobs, cancel running ones, answer waiting ones with 503, end the thread."""
        if self._closed:
            return
        self._closed = True
        for job in list(self._active):
            job.cancelled = True
            job.fail(503, "the server is shutting down", "server_error")
        self._queue.put(_STOP)
        self._running.set()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # ---------------------------------------------------------------- worker
    def _loop(self) -> None:
        pending: deque[Job] = deque()
        stopping = False
        while not stopping:
            if not pending:
                item = self._queue.get()
                if item is _STOP:
                    break
                pending.append(item)
            deadline = time.monotonic() + self.batch_wait
            while sum(j.num_rows for j in pending) < self.max_batch_size:
                timeout = deadline - time.monotonic()
                try:
                    item = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                    break
                pending.append(item)
            self._running.wait()
            while not stopping:  # everything that queued up meanwhile (e.g. while paused)
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                else:
                    pending.append(item)
            if stopping:
                break
            live = [j for j in pending if not (j.cancelled or j.finished)]
            self._count("waiting", -(len(pending) - len(live)))
            pending = deque(live)
            if pending:
                batch = self._select(pending)
                self._run(batch)
        while True:  # answer whatever is left
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                pending.append(item)
        for job in pending:
            job.fail(503, "the server is shutting down", "server_error")

    def _count(self, name: str, delta: int) -> None:
        with self._stats_lock:
            self._stats[name] += delta

    def _select(self, pending: deque[Job]) -> list[Job]:
        """The oldest job and the compatible ones after it that fit (removed from ``pending``)."""
        first = pending.popleft()
        batch = [first]
        if first.key is None:
            return batch
        rows, longest, most_new = first.num_rows, first.longest_prompt, first.params.max_new_tokens
        keep: deque[Job] = deque()
        while pending:
            job = pending.popleft()
            fits = (job.key == first.key and rows + job.num_rows <= self.max_batch_size
                    and (self.context_length is None
                         or max(longest, job.longest_prompt) + max(most_new, job.params.max_new_tokens)
                         <= self.context_length))
            if fits:
                batch.append(job)
                rows += job.num_rows
                longest = max(longest, job.longest_prompt)
                most_new = max(most_new, job.params.max_new_tokens)
            else:
                keep.append(job)
        pending.extend(keep)
        return batch

    def _run(self, jobs: list[Job], retry: bool = False) -> None:
        """Generate for the jobs that generate, then score the jobs that asked for log-probs."""
        generating = [j for j in jobs if j.generate]
        with self._stats_lock:
            s = self._stats
            s["generate_calls" if generating else "score_calls"] += 1
            if not retry:
                s["waiting"] -= len(jobs)
                s["requests"] += len(jobs)
            s["batched_calls"] += len(jobs) > 1
            s["max_requests_per_call"] = max(s["max_requests_per_call"], len(jobs))
            s["calls_by_requests"][len(jobs)] = s["calls_by_requests"].get(len(jobs), 0) + 1
        self._active = jobs
        try:
            again = self._generate(generating) if generating else []
            for job in jobs:
                if not job.generate:  # max_tokens 0: an empty completion per choice
                    job.completions = [Completion("", [], "length")] * job.num_choices
                    job.generated = True
            self._score([j for j in jobs if j.logprobs is not None and j.generated and j not in again])
        finally:
            self._active = []
        for job in again:
            job.reset()
            self._run([job], retry=True)

    def _generate(self, jobs: list[Job]) -> list[Job]:
        """One ``generate`` call for ``jobs``; returns the jobs to run again alone after a failure."""
        rows: list[_Row] = []
        for job in jobs:
            n = job.params.n
            for i, prompt in enumerate(job.prompts):
                if job.greedy:
                    rows.append(_Row(job, prompt, [i * n + j for j in range(n)]))
                else:
                    rows.extend(_Row(job, prompt, [i * n + j]) for j in range(n))
        first = jobs[0].params
        params = replace(first, n=1, stop=[], max_new_tokens=max(j.params.max_new_tokens for j in jobs))
        tracker = _Tracker(rows, self.tokenizer, self.tokenizer_lock)
        again: list[Job] = []
        try:
            generate_ids(self.model, self.tokenizer, [r.prompt for r in rows], params,
                         batch_size=len(rows), stopping_criteria=[tracker])
            with self.tokenizer_lock:
                for row in rows:  # normally all done by the tracker already
                    if not row.done:
                        row.finish(self.tokenizer)
        except Exception as e:  # never let one bad batch kill the worker
            log.exception("generation failed")
            self._count("failed_calls", 1)
            if len(jobs) > 1:  # run the shared call's jobs alone, so only the one at fault fails
                again = [j for j in jobs if not (j.finished or j.emitted or j.cancelled)]
            for job in jobs:
                if job not in again:
                    job.fail(500, f"generation failed: {type(e).__name__}: {e}", "server_error")
        finally:
            if params.seed is not None:
                torch.seed()  # later unseeded requests must not continue a predictable stream
        return again

    def _score(self, jobs: list[Job]) -> None:
        """Each choice's token log-probs: prompt (with echo) and completion, one forward per
        ``max_batch_size`` sequences. Choices that share a completion object (greedy ``n``) are scored once."""
        jobs = [j for j in jobs if not (j.finished or j.cancelled)]
        if not jobs:
            return
        sequences, starts, unique, index = [], [], {}, []
        for job in jobs:
            for c, completion in enumerate(job.completions):
                prompt = job.prompts[c // job.params.n]
                key = (id(job), c // job.params.n, id(completion))
                if key not in unique:
                    unique[key] = len(sequences)
                    sequences.append(prompt + completion.token_ids)
                    starts.append(1 if job.logprobs.echo else len(prompt))
                index.append(unique[key])
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        try:
            scores = score_tokens(self.model, sequences, starts, max(j.logprobs.top for j in jobs), pad_id,
                                  self.max_batch_size)
        except Exception as e:
            log.exception("scoring failed")
            self._count("failed_calls", 1)
            for job in jobs:
                job.fail(500, f"scoring failed: {type(e).__name__}: {e}", "server_error")
            return
        at = 0
        for job in jobs:
            job.deliver([scores[i] for i in index[at:at + job.num_choices]])
            at += job.num_choices


def model_context_length(model) -> int | None:
    """The model's maximum sequence length (prompt plus completion), when its config says."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
