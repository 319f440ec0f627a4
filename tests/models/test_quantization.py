"""--load-in-4bit / --load-in-8bit (QLoRA through bitsandbytes).

Here, without bitsandbytes or a GPU: the quantization config each flag builds, that the loaders
pass it to transformers with the weights placed on the command's device, the k-bit preparation
and LoRA wiring of the recipes' builders, and the refusal (exit 2, one line, no model loaded)
where bitsandbytes cannot run. The real 4-bit and 8-bit training runs only where a CUDA device
and bitsandbytes are present (skipped otherwise, with the reason).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from core_helpers import read_metrics, write_text
from rlhfkit.models.loading import load_kwargs, quantization_config, quantization_problem

pytestmark = pytest.mark.usefixtures("one_thread")

TRAINING_COMMANDS = ["sft", "rm", "dpo", "ppo"]


def test_4bit_is_nf4_with_double_quantization_computing_in_bfloat16_unless_dtype_is_16_bit():
    for dtype in ("float32", "bfloat16"):
        config = quantization_config(4, dtype)
        assert config.load_in_4bit and not config.load_in_8bit
        assert config.bnb_4bit_quant_type == "nf4"
        assert config.bnb_4bit_use_double_quant is True
        assert config.bnb_4bit_compute_dtype == torch.bfloat16
    assert quantization_config(4, "float16").bnb_4bit_compute_dtype == torch.float16


def test_8bit_is_llm_int8():
    config = quantization_config(8, "bfloat16")
    assert config.load_in_8bit and not config.load_in_4bit
    with pytest.raises(ValueError, match="only 4 and 8"):
        quantization_config(2, "float32")


def test_load_kwargs_quantize_onto_the_given_device():
    device = torch.device("cpu")
    assert load_kwargs("bfloat16", device) == {"dtype": torch.bfloat16}  # moved by place() afterwards
    four = load_kwargs("float32", device, 4)
    assert four["device_map"] == {"": device} and four["dtype"] == torch.bfloat16
    assert four["quantization_config"].bnb_4bit_quant_type == "nf4"
    eight = load_kwargs("bfloat16", device, 8)
    assert eight["quantization_config"].load_in_8bit and eight["dtype"] == torch.bfloat16


@pytest.fixture
def fake_quantized_loading(monkeypatch):
    """from_pretrained records its keyword arguments and loads the plain weights (no bitsandbytes here)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    seen: list[dict] = []
    for cls in (AutoModelForCausalLM, AutoModelForSequenceClassification):
        original = cls.from_pretrained.__func__

        def fake(klass, path, *args, _original=original, **kwargs):
            seen.append(kwargs)
            plain = {k: v for k, v in kwargs.items() if k not in ("quantization_config", "device_map")}
            return _original(klass, path, *args, **plain)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(fake))
    return seen


@pytest.mark.parametrize("bits", [4, 8])
def test_the_builders_load_quantized_weights_and_train_only_lora_adapters(bits, fake_quantized_loading, tiny_lm,
                                                                          tmp_path):
    from rlhfkit.models.loading import load_tokenizer
    from rlhfkit.recipes import ppo, rm, sft

    flags = {"load_in_4bit": bits == 4, "load_in_8bit": bits == 8, "lora_r": 4, "output": str(tmp_path)}
    built = [sft.build_model(sft.Config(model=tiny_lm, data="x", **flags), torch.device("cpu")),
             rm.build_model(rm.Config(model=tiny_lm, data="x", **flags), load_tokenizer(tiny_lm), torch.device("cpu")),
             ppo.build_models(ppo.Config(model=tiny_lm, prompts="x", reward="x", **flags), torch.device("cpu"))[1]]
    assert len(fake_quantized_loading) == 3
    for kwargs in fake_quantized_loading:
        config = kwargs["quantization_config"]
        assert (config.load_in_4bit, config.load_in_8bit) == (bits == 4, bits == 8)
        assert kwargs["device_map"] == {"": torch.device("cpu")}
    for model in built:
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trainable and all("lora_" in n or "value_head" in n or "score" in n for n in trainable), trainable
        # prepare_model_for_kbit_training keeps every weight that is not quantized in float32
        assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_quantization_problem_names_what_is_missing(monkeypatch):
    real_find_spec = importlib.util.find_spec

    def pretend(installed: bool, gpu: bool):
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: (object() if installed else None) if name == "bitsandbytes"
                            else real_find_spec(name, *a))
        monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)

    pretend(installed=False, gpu=False)
    assert quantization_problem(4) == ("--load-in-4bit needs bitsandbytes and a CUDA GPU: bitsandbytes is not "
                                       "installed (pip install 'rlhfkit[qlora]') and no CUDA device is visible")
    pretend(installed=True, gpu=False)
    assert quantization_problem(8) == "--load-in-8bit needs bitsandbytes and a CUDA GPU: no CUDA device is visible"
    pretend(installed=False, gpu=True)
    assert quantization_problem(4).endswith("bitsandbytes is not installed (pip install 'rlhfkit[qlora]')")
    pretend(installed=True, gpu=True)
    assert quantization_problem(4) is None


def _command_args(command: str, tiny_lm: str, data: str, out: Path) -> list[str]:
    if command == "ppo":
        reward = write_text(out.parent / "reward.py", "def f(prompts, completions):\n"
                                                      "    return [float(len(c)) for c in completions]\n")
        return ["ppo", "--model", tiny_lm, "--prompts", data, "--reward", f"{reward}:f", "--output", out,
                "--max-new-tokens", "8", "--batch-size", "2"]
    return [command, "--model", tiny_lm, "--data", data, "--output", out]


@pytest.mark.skipif(quantization_problem(4) is None, reason="bitsandbytes can run here: nothing to refuse")
@pytest.mark.parametrize("command", TRAINING_COMMANDS)
@pytest.mark.parametrize("flag", ["--load-in-4bit", "--load-in-8bit"])
def test_refused_with_one_line_and_exit_2_where_bitsandbytes_cannot_run(command, flag, run_cli, no_model_loading,
                                                                      tiny_lm, sft_toy, tmp_path):
    result = run_cli(*_command_args(command, tiny_lm, sft_toy, tmp_path / "out"), flag, "--lora-r", "4")
    assert result.code == 2
    assert result.errors == [f"error: {quantization_problem(int(flag[10]))}"]
    assert "Traceback" not in result.err
    assert no_model_loading == []


def test_quantized_weights_need_lora_and_one_width(run_cli, no_model_loading, tiny_lm, sft_toy, tmp_path,
                                                   monkeypatch):
    import rlhfkit.models.loading as loading

    monkeypatch.setattr(loading, "quantization_problem", lambda bits: None)  # as on a GPU with bitsandbytes
    result = run_cli("sft", "--model", tiny_lm, "--data", sft_toy, "--output", tmp_path, "--load-in-4bit")
    assert result.code == 2
    assert result.errors == ["error: --load-in-4bit needs --lora-r > 0 (quantized weights are frozen: only LoRA "
                             "adapters train on them)"]
    result = run_cli("sft", "--model", tiny_lm, "--data", sft_toy, "--output", tmp_path, "--load-in-4bit",
                     "--load-in-8bit", "--lora-r", "4")
    assert result.errors == ["error: --load-in-4bit and --load-in-8bit exclude each other"]
    result = run_cli("rejection-sampling", "--model", tiny_lm, "--prompts", sft_toy, "--reward", "x.py:f",
                     "--output", tmp_path, "--load-in-8bit", "--lora-r", "4")
    assert result.code == 2
    assert [e for e in result.errors if "load-in" in e] == [
        "error: --load-in-8bit: rejection-sampling merges each round's adapters into a full model, which quantized "
        "weights cannot hold; use it with sft, rm, dpo or ppo"]
    assert no_model_loading == []


# ------------------------------------------------------------------------------------ on a GPU


GPU_REASON = quantization_problem(4) or ""


@pytest.mark.skipif(bool(GPU_REASON), reason=f"the real QLoRA runs need what is missing here: {GPU_REASON}")
@pytest.mark.parametrize("command", TRAINING_COMMANDS)
@pytest.mark.parametrize("flag", ["--load-in-4bit", "--load-in-8bit"])
def test_qlora_trains_on_a_gpu(command, flag, run_cli, tiny_lm, sft_toy, pairs_train, tmp_path):
    data = pairs_train if command in ("rm", "dpo") else sft_toy
    args = _command_args(command, tiny_lm, data, tmp_path / "out")
    result = run_cli(*args, flag, "--lora-r", "4", "--max-steps", "2", "--no-progress", "--dtype", "bfloat16")
    assert result.code == 0, result.err[-3000:]
    rows = read_metrics(tmp_path / "out")
    assert rows and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
