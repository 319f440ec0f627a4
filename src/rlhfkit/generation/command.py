"""``rlhfkit generate``: completions for a prompts file, optionally scored (best-of-N).

    rlhfkit generate --model M --prompts prompts.jsonl --output out.jsonl [--strategy sample --samples-per-prompt 4]
    rlhfkit generate --model M --prompts prompts.jsonl --output out.jsonl --best-of 8 --reward R

    rlhfkit generate --model-url URL --model-name NAME --prompts prompts.jsonl --output out.jsonl

``--best-of N`` is best-of-N mode: it sets ``--samples-per-prompt`` to N and marks the best.

Each output line is the input record plus ``completions`` (a list of strings); with
``--reward``, also ``scores`` (one float per completion) and ``best`` (the highest-scoring one).

With ``--model-url`` the completions come from an OpenAI-compatible endpoint instead (distilling
SFT data from a stronger model): the same output, through :mod:`rlhfkit.models.backends`
(``--concurrency`` requests in flight, retries). Only what an endpoint's API has a field for
applies: the strategy (sample, or greedy as temperature 0), ``--temperature``, ``--top-p``,
``--max-new-tokens``, ``--stop`` (at most 4), and ``--samples-per-prompt`` as that many requests
per prompt (one for greedy); the other decoding flags are refused. Each reply is journaled in
``OUTPUT.requests.jsonl`` (``out.requests.jsonl`` for ``out.jsonl``) as it arrives, so a rerun
sends only the requests that never got one; after an endpoint error the prompts whose completions
all arrived are written, and the command exits 1.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from rlhfkit.config import (
    DATA_CONFIG_HELP,
    GENERATION_BATCH_HELP,
    PROMPTS_HELP,
    REWARD_GATE_HELP,
    REWARD_HELP,
    REWARD_WEIGHT_HELP,
    arg,
    check_data_flag,
    flag,
    validated,
)
from rlhfkit.generation.decoding import SamplingParams, Strategy, generate_chat
from rlhfkit.models.backends import ModelOptions

# Decoding flags an OpenAI-compatible endpoint has no field for, and the value that turns each off.
LOCAL_ONLY = {"top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0, "max_prompt_length": 0}
ENDPOINT_MAX_STOP = 4  # OpenAI's limit on stop sequences


@dataclass
class Config(ModelOptions):
    """Decode completions (greedy, beam search, sampling) and best-of-N, locally or from an endpoint."""

    prompts: str = arg("", PROMPTS_HELP + " Other fields are copied to the output.")
    data_config: str = arg("", DATA_CONFIG_HELP)
    output: str = arg("", "Output JSONL file: each input record plus `completions` (and `scores`, `best`).")
    model: str = arg("smollm2-135m", "Policy: a local path, LoRA adapter folder, hub id, or embedded name (or "
                     "--model-url and --model-name: an endpoint).")
    strategy: Strategy = arg("sample", "greedy (argmax), beam (beam search), or sample.")
    samples_per_prompt: int = arg(1, "Completions per prompt (beam: the best beams).", aliases=("n",))
    num_beams: int = arg(4, "Beams for --strategy beam.")
    temperature: float = arg(1.0, "Sampling temperature.")
    top_k: int = arg(0, "Sample among the k most likely tokens only (0: off).")
    top_p: float = arg(1.0, "Nucleus sampling: the smallest set of tokens with this total probability (1: off).")
    min_p: float = arg(0.0, "Drop tokens less likely than min_p times the most likely one (0: off).")
    repetition_penalty: float = arg(1.0, "Penalty on tokens already present (1: off; CTRL-style).")
    max_new_tokens: int = arg(128, "Maximum tokens generated per completion.")
    max_prompt_length: int = arg(0, "Keep at most this many prompt tokens, from the end (0: no limit).")
    stop: list[str] = arg(default_factory=list, help="Strings that end a completion (cut before them).")
    seed: int = arg(42, "Random seed of the sampler (each batch is seeded from it).")
    generation_batch_size: int = arg(8, GENERATION_BATCH_HELP, aliases=("batch_size",))
    best_of: int = arg(0, "Best-of-N mode: sets --samples-per-prompt to N and adds `scores` and `best`, the "
                       "completion --reward scores highest (needs --reward).")
    reward: list[str] = arg(default_factory=list, help=REWARD_HELP + " Adds `scores` (the combined score) and "
                            "`best`.")
    reward_weight: list[float] = arg(default_factory=list, help=REWARD_WEIGHT_HELP)
    reward_gate: str = arg("", REWARD_GATE_HELP)
    prm_aggregate: Literal["min", "prod", "last"] = arg(
        "min", "With --reward prm:PATH: a completion's score from its steps' probabilities of being correct: the "
        "weakest step (min), all steps correct (prod), or the last step (last).")
    dtype: Literal["float32", "bfloat16"] = arg("float32", "Model dtype.")

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(strategy=self.strategy, max_new_tokens=self.max_new_tokens,
                              temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                              min_p=self.min_p, repetition_penalty=self.repetition_penalty,
                              num_beams=self.num_beams, n=self.best_of or self.samples_per_prompt, stop=list(self.stop),
                              seed=self.seed)

    def validate(self) -> list[str]:
        from rlhfkit.rl.rewards import check_reward_combination

        problems = check_data_flag("prompts", self.prompts) + self.model_problems()
        if not self.output:
            problems.append("--output is required")
        if self.model_url:
            problems += self.endpoint_problems()
        if self.max_prompt_length < 0:
            problems.append("--max-prompt-length must be >= 0")
        if self.best_of < 0:
            problems.append("--best-of must be >= 0")
        if self.best_of:
            if not self.reward:
                problems.append("--best-of needs --reward")
            if self.samples_per_prompt not in (1, self.best_of):
                problems.append(f"--best-of {self.best_of} sets the completions per prompt; "
                                f"--samples-per-prompt {self.samples_per_prompt} contradicts it")
            if self.strategy == "greedy" and self.best_of > 1:
                problems.append("--best-of with --strategy greedy would score N identical completions; "
                                "use --strategy sample (or beam)")
        problems += check_reward_combination(self.reward, self.reward_weight, self.reward_gate, required=False)
        spelled = {name: f"--{flag(name)}" for name in vars(self.sampling_params())}
        problems += self.sampling_params().problems({**spelled, "n": "--samples-per-prompt"})
        return problems

    def endpoint_problems(self) -> list[str]:
        """With --model-url: the decoding flags an endpoint cannot honour."""
        problems = [f"--{flag(name)} applies to a local model only (OpenAI's API has no such field); leave it at "
                    f"{off!r} with --model-url" for name, off in LOCAL_ONLY.items() if getattr(self, name) != off]
        if self.strategy == "beam":
            problems.append("--strategy beam needs a local model (an endpoint samples, or decodes greedily at "
                            "temperature 0)")
        if len(self.stop) > ENDPOINT_MAX_STOP:
            problems.append(f"--stop: an endpoint takes at most {ENDPOINT_MAX_STOP} stop strings")
        return problems

    def endpoint_request(self) -> tuple[float, dict]:
        """The temperature and the other sampling fields of every endpoint request."""
        if self.strategy == "greedy":
            return 0.0, ({"stop": list(self.stop)} if self.stop else {})
        fields = {"top_p": self.top_p} if self.top_p < 1 else {}
        return self.temperature, {**fields, **({"stop": list(self.stop)} if self.stop else {})}


def with_completions(records: list[dict], prompts: list, completions: list[list[str]], reward=None) -> list[dict]:
    """The input records plus ``completions`` (and ``scores``/``best`` when ``reward`` is given)."""
    from rlhfkit.generation.best_of_n import score_completions, select_best

    rows = [{**rec, "completions": comps} for rec, comps in zip(records, completions)]
    if reward is not None and rows:
        for row, chosen in zip(rows, select_best(completions, score_completions(reward, prompts, completions))):
            row["scores"], row["best"] = chosen.scores, chosen.best
    return rows


def local_completions(prompts: list, cfg: Config) -> list[list[str]]:
    from rlhfkit.models.loading import load_policy

    model, tokenizer = load_policy(cfg.model, cfg.dtype)  # on default_device(): the GPU when there is one
    return generate_chat(model, tokenizer, prompts, cfg.sampling_params(), cfg.generation_batch_size,
                         cfg.max_prompt_length or None)


def endpoint_completions(prompts: list, cfg: Config) -> tuple[list[list[str] | None], Exception | None]:
    """Each prompt's completions from ``--model-url``, and the endpoint error that stopped the run if
    one did (then None for each prompt whose completions did not all arrive before it)."""
    from rlhfkit.data.chat import as_messages
    from rlhfkit.models.backends import BackendError, ReplyJournal, backend_label, journaled_replies, model_backend
    from rlhfkit.models.backends import request_key as key

    temperature, fields = cfg.endpoint_request()
    n = cfg.best_of or cfg.samples_per_prompt
    draws = 1 if cfg.strategy == "greedy" else n  # greedy: one request, its reply n times
    backend = model_backend(cfg, role="model", sampling=fields)
    journal = ReplyJournal(journal_path(cfg.output))
    chats = [as_messages(p) for p in prompts]
    label = backend_label(backend)
    keys = [[key("generate", label, chat, temperature, fields, cfg.max_new_tokens, i) for i in range(draws)]
            for chat in chats]
    unique = {k: chat for chat, row in zip(chats, keys) for k in row}  # a prompt given twice is asked once
    failure = None
    try:
        journaled_replies(backend, list(unique.values()), list(unique), journal, temperature, cfg.max_new_tokens)
    except BackendError as e:  # every reply that arrived is in the journal
        failure = e
    finally:
        backend.close()
    return [[journal.get(row[i % draws]).text for i in range(n)] if all(k in journal for k in row) else None
            for row in keys], failure


def journal_path(output: str) -> Path:
    """Where ``--model-url`` replies are journaled: ``out.requests.jsonl`` next to ``out.jsonl``."""
    return Path(output).with_suffix(".requests.jsonl")


def main(cfg: Config) -> int:
    from rlhfkit.data.io import write_jsonl
    from rlhfkit.data.schema import load_prompts
    from rlhfkit.rl.rewards import build_reward

    validated(cfg)
    examples = load_prompts(cfg.prompts, config=cfg.data_config, seed=cfg.seed)
    reward = build_reward(cfg.reward, cfg.reward_weight, cfg.reward_gate, cfg.dtype,
                          prm_aggregate=cfg.prm_aggregate) if cfg.reward else None
    records, prompts = [dict(ex.source.data) for ex in examples], [ex.prompt for ex in examples]
    t0 = time.time()
    failure = None
    if cfg.model_url:
        completions, failure = endpoint_completions(prompts, cfg)
        done = [i for i, c in enumerate(completions) if c is not None]
        records, prompts, completions = [records[i] for i in done], [prompts[i] for i in done], \
            [completions[i] for i in done]
    else:
        completions = local_completions(prompts, cfg)
    rows = with_completions(records, prompts, completions, reward)
    write_jsonl(cfg.output, rows)
    if failure is not None:
        print(f"error: {failure} ({len(rows)} of {len(examples)} prompts with all their completions are in "
              f"{cfg.output}; rerun the same command to continue)", file=sys.stderr)
        return 1
    total = sum(len(r["completions"]) for r in rows)
    line = f"generate: {total} completions for {len(rows)} prompts in {time.time() - t0:.1f} s -> {cfg.output}"
    if reward is not None:
        mean_all = sum(sum(r["scores"]) for r in rows) / max(total, 1)
        mean_best = sum(max(r["scores"]) for r in rows) / max(len(rows), 1)
        line += f"; mean score {mean_all:.3f}, mean best {mean_best:.3f}"
    print(line, flush=True)
    return 0
