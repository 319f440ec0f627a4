"""``rlhfkit inspect-data``: one example token by token, trained tokens marked.

Template problems (a doubled EOS, an empty assistant mask, a missing generation prompt) are
visible at a glance: trained tokens are shown in [brackets] (and in colour on a terminal).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from rlhfkit.config import DATA_CONFIG_HELP, arg, check_data_flag, validated
from rlhfkit.errors import InputError


@dataclass
class Config:
    """Show one example token by token with the trained (completion) tokens marked."""

    model: str = arg("smollm2-135m", "The model whose tokenizer and chat template to use.")
    data: str = arg("", "SFT, preference or prompt records: a file, a Hugging Face dataset id or a mixture "
                    "(docs/data.md; a mixture is drawn with seed 0).")
    data_config: str = arg("", DATA_CONFIG_HELP)
    index: int = arg(0, "Which example (0-based, after ranking expansion).")
    max_length: int = arg(512, "Maximum tokens; longer examples are shown truncated as training would.")
    color: bool = arg(True, "Colour the trained tokens when writing to a terminal.")

    def validate(self) -> list[str]:
        problems = check_data_flag("data", self.data)
        if self.index < 0:
            problems.append("--index must be >= 0")
        return problems


def example_sequences(data: str, config: str = "") -> list[tuple[str, object, object]]:
    """(label, prompt, completion) for every training sequence of the file, whatever its schema."""
    from rlhfkit.data.io import read_records
    from rlhfkit.data.schema import parse_preference, parse_prompt, parse_sft

    out, problems = [], []
    for rec in read_records(data, config=config):
        d = rec.data
        if "chosen" in d or "completions" in d:
            for p in parse_preference(rec, problems):
                out.append((f"{rec.file}:{rec.line} chosen", p.prompt, p.chosen))
                out.append((f"{rec.file}:{rec.line} rejected", p.prompt, p.rejected))
        elif "completion" in d or ("messages" in d and any(m.get("role") == "assistant" for m in d["messages"]
                                                          if isinstance(m, dict))):
            ex = parse_sft(rec, problems)
            if ex:
                out.append((f"{rec.file}:{rec.line}", ex.prompt, ex.completion))
        else:
            ex = parse_prompt(rec, problems)
            if ex:
                out.append((f"{rec.file}:{rec.line} (prompt only)", ex.prompt, None))
    if problems:
        raise InputError(problems)
    return out


def render_tokens(tokenizer, ids: list[int], trained: list[bool], color: bool) -> str:
    parts = []
    for t, is_trained in zip(ids, trained):
        piece = tokenizer.decode([t]).replace("\n", "\\n")
        if is_trained:
            parts.append(f"\033[42m[{piece}]\033[0m" if color else f"[{piece}]")
        else:
            parts.append(piece + "|")
    return "".join(parts)


def main(cfg: Config) -> int:
    from rlhfkit.data.chat import encode, encode_prompt
    from rlhfkit.models.loading import load_tokenizer

    sequences = example_sequences(validated(cfg).data, cfg.data_config)
    if cfg.index >= len(sequences):
        raise InputError(f"--index {cfg.index}: the file has {len(sequences)} example(s)")
    label, prompt, completion = sequences[cfg.index]
    tokenizer = load_tokenizer(cfg.model)
    if completion is None:
        ids = encode_prompt(tokenizer, prompt, cfg.max_length)
        trained = [False] * len(ids)
        truncated = False
    else:
        try:
            enc = encode(tokenizer, prompt, completion, cfg.max_length)
        except ValueError as e:
            raise InputError(f"{label}: {e}") from None
        ids, trained, truncated = enc.input_ids, enc.trained, enc.truncated
    color = cfg.color and sys.stdout.isatty()
    print(f"example {cfg.index} of {len(sequences)}: {label}")
    print(f"{len(ids)} tokens, {sum(trained)} trained{' (truncated)' if truncated else ''}; "
          f"trained tokens in [brackets], others end with |")
    print(render_tokens(tokenizer, ids, trained, color))
    eos = tokenizer.eos_token_id
    trained_ids = [t for t, m in zip(ids, trained) if m]
    if completion is not None and not trained_ids:
        print("warning: the completion mask is empty: this example would be refused")
    if eos is not None and sum(1 for a, b in zip(trained_ids, trained_ids[1:]) if a == b == eos):
        print("warning: doubled EOS in the trained tokens")
    if completion is not None and eos is not None and eos not in trained_ids:
        print("warning: no EOS among the trained tokens: the model will not learn to stop")
    return 0
