"""Chat templates and completion masks.

One rule everywhere: a prompt given as messages gets the tokenizer's chat template; a prompt
given as a string becomes a single user turn when the tokenizer has a chat template (an
instruct model), and is used as raw text when it has none (a base model). A completion string is
one assistant turn; without a template it is raw text followed by the EOS token.

Sequences are tokenised segment by segment (prompt part, then each trained assistant part), so
the trained-token mask is exact and never depends on how a tokenizer would merge across the
boundary.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhfkit.errors import InputError


def as_messages(prompt) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(tokenizer, prompt) -> str:
    """The text the model sees before it answers ``prompt``."""
    if not has_template(tokenizer):
        if isinstance(prompt, str):
            return prompt
        return "\n".join(f"{m['role']}: {m['content']}" for m in prompt) + "\nassistant: "
    return tokenizer.apply_chat_template(as_messages(prompt), add_generation_prompt=True, tokenize=False)


def completion_messages(completion) -> list[dict]:
    return [{"role": "assistant", "content": completion}] if isinstance(completion, str) else list(completion)


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def raw_text_ids(tokenizer, text: str) -> list[int]:
    """Token ids of text that no chat template rendered, starting with the tokenizer's BOS when it
    adds one (``add_bos_token``, as its own ``__call__`` would).

    The one BOS rule of rlhfkit: raw text (a base model's prompt, ``/v1/completions``) gets the
    tokenizer's BOS; text rendered by a chat template carries whatever its template writes and
    gets nothing more.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    add = bos is not None and getattr(tokenizer, "add_bos_token", False)
    return ([bos] if add else []) + _ids(tokenizer, text)


def segments(tokenizer, prompt, completion) -> list[tuple[str, bool]]:
    """(text, trained) segments of a prompt and its completion, in order."""
    if not has_template(tokenizer):
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise ValueError("message lists need a tokenizer with a chat template")
        return [(prompt, False), (completion + (tokenizer.eos_token or ""), True)]
    history = as_messages(prompt)
    out: list[tuple[str, bool]] = []
    rendered = ""
    for message in completion_messages(completion):
        if message["role"] == "assistant":
            before = _render(tokenizer, history, add_generation_prompt=True)
            after = _render(tokenizer, history + [message], add_generation_prompt=False)
            if not before.startswith(rendered) or not after.startswith(before):
                raise ValueError("the chat template is not prefix-stable: cannot mark the assistant tokens")
            out.append((before[len(rendered):], False))
            out.append((after[len(before):], True))
            rendered = after
        else:
            rendered_next = _render(tokenizer, history + [message], add_generation_prompt=False)
            if not rendered_next.startswith(rendered):
                raise ValueError("the chat template is not prefix-stable: cannot mark the assistant tokens")
            out.append((rendered_next[len(rendered):], False))
            rendered = rendered_next
        history = history + [message]
    return [(t, trained) for t, trained in out if t]


@dataclass
class Encoded:
    """Token ids and the mask of trained (completion) tokens."""

    input_ids: list[int]
    trained: list[bool]
    truncated: bool = False

    @property
    def prompt_length(self) -> int:
        """Tokens before the first trained token."""
        return self.trained.index(True) if True in self.trained else len(self.trained)


def encode(tokenizer, prompt, completion, max_length: int | None = None,
           truncation: str = "truncate") -> Encoded | None:
    """Tokenise prompt + completion with the trained-token mask.

    Truncation policy when longer than ``max_length``: ``truncate`` removes prompt tokens from
    the left (keeping the latest context) and then completion tokens from the right; ``drop``
    returns None. The result's ``truncated`` flag lets callers count affected examples.
    """
    ids: list[int] = []
    trained: list[bool] = []
    raw = not has_template(tokenizer)
    for i, (text, is_trained) in enumerate(segments(tokenizer, prompt, completion)):
        piece = raw_text_ids(tokenizer, text) if i == 0 and raw else _ids(tokenizer, text)
        ids += piece
        trained += [is_trained] * len(piece)
    enc = Encoded(ids, trained)
    if max_length is not None and len(ids) > max_length:
        if truncation == "drop":
            return None
        excess = len(ids) - max_length
        cut_left = min(excess, max(enc.prompt_length - 1, 0))
        ids, trained = ids[cut_left:], trained[cut_left:]
        ids, trained = ids[:max_length], trained[:max_length]
        enc = Encoded(ids, trained, truncated=True)
    return enc


def encode_prompt(tokenizer, prompt, max_length: int | None = None) -> list[int]:
    """Prompt token ids for generation (kept from the left end when too long)."""
    text = render_prompt(tokenizer, prompt)
    ids = _ids(tokenizer, text) if has_template(tokenizer) else raw_text_ids(tokenizer, text)
    if max_length is not None and len(ids) > max_length:
        ids = ids[-max_length:]
    return ids


def prompt_text(prompt) -> str:
    """A readable one-string form of a prompt (for reward functions, reports and judges)."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(m["content"] for m in prompt if m["role"] != "system")


def check_encodable(tokenizer, examples, describe) -> None:
    """Raise InputError naming every example whose completion mask would be empty."""
    problems = []
    for ex in examples:
        try:
            enc = encode(tokenizer, ex.prompt, ex.completion)
        except ValueError as e:
            problems.append(describe(ex, str(e)))
            continue
        if not any(enc.trained):
            problems.append(describe(ex, "the completion mask is empty: no token would be trained"))
    if problems:
        raise InputError(problems)
