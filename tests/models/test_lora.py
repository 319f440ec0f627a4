"""LoRA: only adapter parameters train; adapter-only and merged (--merge-lora) saves load back and
compute the same function."""

from __future__ import annotations

import pytest
import torch

from core_helpers import read_metrics
from rlhfkit.models.loading import apply_lora, is_adapter_dir, load_causal_lm

pytestmark = pytest.mark.usefixtures("one_thread")


def _loss(model) -> torch.Tensor:
    ids = torch.tensor([[5, 9, 14, 20, 33, 40, 7]])
    return model(input_ids=ids, labels=ids).loss


def test_apply_lora_trains_only_adapter_parameters(tiny_lm):
    model = apply_lora(load_causal_lm(tiny_lm), r=4, alpha=8)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert not any("lora_" in n for n in frozen)
    # all-linear: every projection of every layer (not the tied lm_head) gets an adapter
    assert {n.split(".")[-4] for n in trainable if "lora_A" in n} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        _loss(model).backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable


def test_lora_targets_pick_the_modules(tiny_lm):
    model = apply_lora(load_causal_lm(tiny_lm), r=2, alpha=4, targets="q_proj, v_proj")
    wrapped = {n.split(".")[-4] for n, _ in model.named_parameters() if "lora_A" in n}
    assert wrapped == {"q_proj", "v_proj"}
    assert model.peft_config["default"].lora_alpha == 4 and model.peft_config["default"].r == 2


@pytest.fixture(scope="module")
def lora_runs(one_thread, tiny_lm, sft_toy, tmp_path_factory):
    """The same SFT run with LoRA saved adapter-only and merged."""
    from rlhfkit.cli import main

    root = tmp_path_factory.mktemp("lora")
    common = ["sft", "--model", tiny_lm, "--data", sft_toy, "--max-steps", "3", "--batch-size", "2", "--lr", "5e-2",
              "--lora-r", "4", "--lora-alpha", "8", "--no-progress"]
    assert main(common + ["--output", str(root / "adapter")]) == 0
    assert main(common + ["--output", str(root / "merged"), "--merge-lora"]) == 0
    return root / "adapter", root / "merged"


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([[1, 60, 70, 80, 2, 90, 100]])).logits


def test_adapter_only_save_loads_back(lora_runs, tiny_lm):
    from transformers import AutoModelForCausalLM

    adapter, _ = lora_runs
    assert is_adapter_dir(str(adapter))
    assert (adapter / "adapter_model.safetensors").exists() and not (adapter / "model.safetensors").exists()
    model = load_causal_lm(str(adapter))
    assert type(model).__name__ == "PeftModelForCausalLM"
    assert not _logits(model).allclose(_logits(load_causal_lm(tiny_lm)), atol=1e-4), "the adapter changed nothing"
    # transformers' own peft integration reads the folder too
    direct = AutoModelForCausalLM.from_pretrained(adapter)
    assert torch.allclose(_logits(direct), _logits(model), atol=1e-5)
    assert len(read_metrics(adapter)) == 3


def test_merged_save_is_a_plain_model_equal_to_base_plus_adapter(lora_runs):
    from transformers import AutoModelForCausalLM

    adapter, merged = lora_runs
    assert not is_adapter_dir(str(merged)) and (merged / "model.safetensors").exists()
    plain = AutoModelForCausalLM.from_pretrained(merged)
    assert type(plain).__name__ == "LlamaForCausalLM"
    assert not any("lora" in n for n, _ in plain.named_parameters())
    # same seed, same data: the merged weights compute what base + adapter computes
    assert torch.allclose(_logits(plain), _logits(load_causal_lm(str(adapter))), atol=1e-5)
