"""``rlhfkit generate``: completions for a prompts file, optionally scored (best-of-N).

    rlhfkit generate --model M --prompts prompts.jsonl --output out.jsonl [--strategy sample --samples-per-prompt 4]
    rlhfkit generate --model M --prompts prompts.jsonl --output out.jsonl --best-of 8 --reward R

``--best-of N`` is best-of-N mode: it sets ``--samples-per-prompt`` to N and marks the best.

Each output line is the input record plus ``completions`` (a list of strings); with
``--reward``, also ``scores`` (one float per completion) and ``best`` (the highest-scoring one).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

from rlhfkit.config import DATA_CONFIG_HELP, GENERATION_BATCH_HELP, PROMPTS_HELP, arg, check_data_flag, flag, validated
from rlhfkit.generation.decoding import SamplingParams, Strategy, generate_chat


@dataclass
class Config:
    """Decode completions (greedy, beam search, sampling) and best-of-N."""

    prompts: str = arg("", PROMPTS_HELP + " Other fields are copied to the output.")
    data_config: str = arg("", DATA_CONFIG_HELP)
    output: str = arg("", "Output JSONL file: each input record plus `completions` (and `scores`, `best`).")
    model: str = arg("smollm2-135m", "Policy: a local path, LoRA adapter folder, hub id, or embedded name.")
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
    reward: str = arg("", "Reward scoring the completions: a reward-model folder, file.py:function, "
                      "module:function, or an http(s) endpoint. Adds `scores` and `best`.")
    dtype: Literal["float32", "bfloat16"] = arg("float32", "Model dtype.")

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(strategy=self.strategy, max_new_tokens=self.max_new_tokens,
                              temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                              min_p=self.min_p, repetition_penalty=self.repetition_penalty,
                              num_beams=self.num_beams, n=self.best_of or self.samples_per_prompt, stop=list(self.stop),
                              seed=self.seed)

    def validate(self) -> list[str]:
        from rlhfkit.rl.rewards import check_reward_spec

        problems = check_data_flag("prompts", self.prompts)
        if not self.output:
            problems.append("--output is required")
        if self.generation_batch_size < 1:
            problems.append("--generation-batch-size must be >= 1")
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
        if self.reward:
            problems += check_reward_spec(self.reward)
        spelled = {name: f"--{flag(name)}" for name in vars(self.sampling_params())}
        problems += self.sampling_params().problems({**spelled, "n": "--samples-per-prompt"})
        return problems


def generate_records(model, tokenizer, records: list[dict], prompts: list, cfg: Config, reward=None) -> list[dict]:
    """The input records plus ``completions`` (and ``scores``/``best`` when ``reward`` is given)."""
    from rlhfkit.generation.best_of_n import score_completions, select_best

    completions = generate_chat(model, tokenizer, prompts, cfg.sampling_params(), cfg.generation_batch_size,
                                cfg.max_prompt_length or None)
    rows = [{**rec, "completions": comps} for rec, comps in zip(records, completions)]
    if reward is not None:
        for row, chosen in zip(rows, select_best(completions, score_completions(reward, prompts, completions))):
            row["scores"], row["best"] = chosen.scores, chosen.best
    return rows


def main(cfg: Config) -> int:
    from rlhfkit.data.io import write_jsonl
    from rlhfkit.data.schema import load_prompts
    from rlhfkit.models.loading import load_policy
    from rlhfkit.rl.rewards import load_reward

    validated(cfg)
    examples = load_prompts(cfg.prompts, config=cfg.data_config, seed=cfg.seed)
    reward = load_reward(cfg.reward, cfg.dtype) if cfg.reward else None
    model, tokenizer = load_policy(cfg.model, cfg.dtype)  # on default_device(): the GPU when there is one
    t0 = time.time()
    rows = generate_records(model, tokenizer, [dict(ex.source.data) for ex in examples],
                            [ex.prompt for ex in examples], cfg, reward)
    write_jsonl(cfg.output, rows)
    total = sum(len(r["completions"]) for r in rows)
    line = f"generate: {total} completions for {len(rows)} prompts in {time.time() - t0:.1f} s -> {cfg.output}"
    if reward is not None:
        mean_all = sum(sum(r["scores"]) for r in rows) / max(total, 1)
        mean_best = sum(max(r["scores"]) for r in rows) / max(len(rows), 1)
        line += f"; mean score {mean_all:.3f}, mean best {mean_best:.3f}"
    print(line, flush=True)
    return 0
