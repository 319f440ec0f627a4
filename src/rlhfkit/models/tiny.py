"""Tiny random models built from a config, for tests: no downloads, a few thousand parameters.

The tokenizer is byte-level with no merges (one token per byte) plus ChatML special tokens and a
ChatML chat template, so every code path that applies a chat template is exercised.
"""

from __future__ import annotations

from pathlib import Path

PAD, BOS, EOS = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_tiny_tokenizer(chat_template: bool = True, merges: list[tuple[str, str]] = ()):
    """``merges``: byte-level BPE merges (pairs of tokens in the byte alphabet, e.g. ``(".", "Ċ")``
    for ".\n"), each adding its merged token to the vocabulary; none by default (one token per byte)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {PAD: 0, BOS: 1, EOS: 2}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=list(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, bos_token=BOS)
    fast.add_special_tokens({"additional_special_tokens": [BOS, EOS]})
    if chat_template:
        fast.chat_template = CHATML_TEMPLATE
    return fast


def tiny_llama_config(vocab_size: int, **overrides):
    from transformers import LlamaConfig

    kwargs = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def make_tiny_causal_lm(path: str | Path, seed: int = 0, chat_template: bool = True, **overrides) -> str:
    """Save a tiny random Llama causal LM and its tokenizer to ``path``; return the path."""
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(path)
    tokenizer = make_tiny_tokenizer(chat_template)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(len(tokenizer), **overrides))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def make_tiny_reward_backbone(path: str | Path, seed: int = 0) -> str:
    """A tiny causal LM folder used as a reward-model backbone (the head is added by ``rm``)."""
    return make_tiny_causal_lm(path, seed=seed)
