"""Typed, documented configuration: one dataclass per command, the CLI generated from it.

A config class is a ``@dataclass`` whose fields are declared with :func:`arg` (the help text is
the field's documentation and the ``--help`` text). Values are resolved in the order
dataclass default < ``--config file.yaml`` < command-line flags, checked by :func:`validated`
(types, then the class's ``validate()``, which returns a list of problems) before any model is
loaded, and saved next to the outputs as ``config.yaml`` by :func:`save_config`.

One concept has one flag name in every command (``--model``, ``--data``, ``--prompts``,
``--samples-per-prompt``, ``--generation-batch-size``, ``--ref-model``, ...). A renamed flag
stays accepted as a hidden alias (``arg(..., aliases=("policy",))``): on the command line and
as a key of a ``--config`` file it sets the new field and prints one deprecation note.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from rlhfkit.data.io import data_spec_problems
from rlhfkit.errors import InputError


def arg(default: Any = dataclasses.MISSING, help: str = "", *, positional: bool = False,
        default_factory: Any = dataclasses.MISSING, aliases: tuple[str, ...] = ()) -> Any:
    """Declare a config field: its default and its documentation (the ``--help`` text).

    ``positional=True`` makes it a positional command-line argument (e.g. ``label import FILE``).
    ``aliases``: former names of the field (snake_case). ``--former-name`` and a ``former_name:``
    key in a ``--config`` file still set it, hidden from ``--help``, with a deprecation note.
    """
    meta = {"help": help, "positional": positional, "aliases": tuple(aliases)}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------------------------
# Shared pieces: the flags every training command has, the words every command uses.
# --------------------------------------------------------------------------------------------

DATA_CONFIG_HELP = ("Configuration (subset) of the Hugging Face dataset ids in this command's data flags "
                    "(datasets.load_dataset's `name`); local files ignore it.")
PROMPTS_HELP = ("Prompts: records {\"prompt\": str | messages} or {\"messages\": [...]} in a .jsonl/.json/.parquet "
                "file, a saved `datasets` folder, a Hugging Face dataset id or a mixture (docs/data.md).")
GENERATION_BATCH_HELP = "Prompts per generate call (each prompt gives --samples-per-prompt rows)."
REWARD_HELP = ("Reward source, repeatable: a reward-model folder (`rlhfkit rm`), prm:PATH (a process reward model, "
               "`rlhfkit prm`), path/to/file.py:function or "
               "package.module:function called as f(prompts, completions) -> list[float], or an http(s):// "
               "endpoint; NAME=SPEC names it (default: the function name, the folder's or the URL host's). "
               "Several rewards are combined by --reward-weight and --reward-gate (docs/ppo.md).")
REWARD_WEIGHT_HELP = "Weight of each --reward in the combined score, in order (default: 1 each)."
REWARD_GATE_HELP = ("NAME:THRESHOLD, safety first (Llama 2): where reward NAME scores below THRESHOLD the combined "
                    "score is NAME's score, elsewhere the weighted sum.")


@dataclass
class TrainConfig:
    """Flags common to every training command (sft, rm, dpo, ppo, ...)."""

    # The field holding the command's input, the one it requires: ``data`` (training records), or
    # ``prompts`` for the commands that sample their own completions (ppo, rejection-sampling).
    input_field: ClassVar[str] = "data"

    model: str = arg("smollm2-135m", "Model: a local path, a hub id, or an embedded name "
                     "(smollm2-135m, minilm-l6).")
    data: str = arg("", "Training data: a .jsonl/.json/.parquet file, a saved `datasets` directory, a Hugging Face "
                    "dataset id (name or org/name, :split, default train), or a mixture a.jsonl:0.7,org/b:0.3 "
                    "(docs/data.md).")
    eval_data: str = arg("", "Held-out data in the same forms (optional).")
    data_config: str = arg("", DATA_CONFIG_HELP)
    output: str = arg("", "Output directory (config.yaml, metrics.jsonl, checkpoints, final model).")
    epochs: float = arg(1.0, "Number of passes over the training data (ignored when --max-steps > 0).")
    max_steps: int = arg(0, "Number of optimizer steps; 0 means derive it from --epochs.")
    batch_size: int = arg(8, "Examples per device per micro-batch.")
    grad_accum: int = arg(1, "Micro-batches accumulated per optimizer step.")
    lr: float = arg(1e-5, "Peak learning rate (AdamW).")
    weight_decay: float = arg(0.0, "AdamW weight decay.")
    warmup_ratio: float = arg(0.0, "Fraction of the steps spent warming the learning rate up linearly.")
    lr_schedule: Literal["linear", "cosine", "constant"] = arg(
        "linear", "Learning-rate decay after warmup.")
    max_grad_norm: float = arg(1.0, "Gradient clipping threshold (global L2 norm); 0 disables.")
    max_length: int = arg(512, "Maximum tokens of prompt plus completion.")
    truncation: Literal["truncate", "drop"] = arg(
        "truncate", "Examples longer than --max-length: `truncate` cuts the prompt from the left "
        "(keeping the latest turns) and then the completion from the right; `drop` skips them. "
        "The number affected is always reported.")
    seed: int = arg(42, "Random seed for model init, data order, dropout and sampling.")
    logging_steps: int = arg(1, "Write a metrics row every N optimizer steps.")
    save_steps: int = arg(0, "Write a checkpoint every N optimizer steps (0: only at the end).")
    save_total_limit: int = arg(2, "Keep at most this many checkpoints (0: keep all).")
    save_only_model: bool = arg(False, "Checkpoints hold only the model (loadable by transformers), no optimizer, "
                                "scheduler or RNG state, and none is written after the last step (the final model "
                                "is that step's): about a third of the disk with Adam, but --resume cannot continue "
                                "the run (Hugging Face Trainer's save_only_model).")
    resume: bool = arg(False, "Continue from the newest checkpoint in --output.")
    lora_r: int = arg(0, "LoRA rank; 0 trains all parameters.")
    lora_alpha: int = arg(16, "LoRA alpha (scaling = alpha / r).")
    lora_dropout: float = arg(0.0, "LoRA dropout.")
    lora_targets: str = arg("all-linear", "Comma-separated module names for LoRA, or `all-linear`.")
    merge_lora: bool = arg(False, "Save the final model with the LoRA weights merged into the base "
                           "(otherwise an adapter-only folder).")
    dtype: Literal["float32", "bfloat16"] = arg("float32", "Parameter dtype for training: bfloat16 stores the "
                                                "weights, gradients and Adam moments in bfloat16 (half the memory; "
                                                "updates smaller than bfloat16's resolution are lost).")
    bf16: bool = arg(False, "Mixed precision: the forward passes under bfloat16 autocast (matmuls in bfloat16, "
                     "faster on CPUs with native bfloat16) while the weights, gradients and optimizer state stay "
                     "float32 and the log-softmax, losses and KL are computed in float32 (docs/training.md). "
                     "Excludes --dtype bfloat16.")
    gradient_checkpointing: bool = arg(False, "Recompute each layer's activations in the backward pass instead "
                                       "of storing them: less memory, about a third more compute, same gradients.")
    load_in_4bit: bool = arg(False, "QLoRA: load the base weights quantized to 4-bit NF4 (bitsandbytes, CUDA only; "
                             "pip install 'rlhfkit[qlora]'); needs --lora-r > 0.")
    load_in_8bit: bool = arg(False, "Load the base weights quantized to 8 bits (bitsandbytes LLM.int8(), CUDA "
                             "only); needs --lora-r > 0.")
    report_to: Literal["none", "tensorboard", "wandb"] = arg("none", "Extra metrics sink besides metrics.jsonl.")
    progress: bool = arg(True, "Show a progress bar.")

    @property
    def quantization_bits(self) -> int:
        """4 or 8 with --load-in-4bit / --load-in-8bit, else 0."""
        return 4 if self.load_in_4bit else 8 if self.load_in_8bit else 0

    def validate(self) -> list[str]:
        problems = []
        if not getattr(self, self.input_field):
            problems.append(f"--{flag(self.input_field)} is required")
        if not self.output:
            problems.append("--output is required")
        for name in ("batch_size", "grad_accum", "logging_steps", "max_length"):
            if getattr(self, name) < 1:
                problems.append(f"--{flag(name)} must be >= 1 (got {getattr(self, name)})")
        for name in ("max_steps", "save_steps", "save_total_limit", "lora_r"):
            if getattr(self, name) < 0:
                problems.append(f"--{flag(name)} must be >= 0 (got {getattr(self, name)})")
        if self.resume and self.save_only_model:
            problems.append("--resume cannot continue a run saved with --save-only-model (its checkpoints hold no "
                            "optimizer, scheduler or RNG state)")
        if self.lr <= 0:
            problems.append(f"--lr must be > 0 (got {self.lr})")
        if not 0 <= self.warmup_ratio < 1:
            problems.append(f"--warmup-ratio must be in [0, 1) (got {self.warmup_ratio})")
        if self.epochs <= 0 and self.max_steps == 0:
            problems.append("--epochs must be > 0 when --max-steps is 0")
        if self.max_grad_norm < 0:
            problems.append("--max-grad-norm must be >= 0")
        if self.bf16 and self.dtype == "bfloat16":
            problems.append("--bf16 (bfloat16 compute over float32 weights) and --dtype bfloat16 (bfloat16 weights) "
                            "exclude each other: choose one")
        if self.merge_lora and self.lora_r == 0:
            problems.append("--merge-lora needs --lora-r > 0")
        problems += self._quantization_problems()
        if _looks_local(self.model) and not os.path.exists(os.path.expanduser(self.model)):
            problems.append(f"--model: no such file or directory: {self.model}")
        # required: checked first
        problems += check_data_flag(self.input_field, getattr(self, self.input_field), required=False)
        problems += check_data_flag("eval_data", self.eval_data, required=False)
        return problems

    def _quantization_problems(self) -> list[str]:
        if not self.quantization_bits:
            return []
        from rlhfkit.models.loading import quantization_problem

        if self.load_in_4bit and self.load_in_8bit:
            return ["--load-in-4bit and --load-in-8bit exclude each other"]
        problems = [] if self.lora_r else [f"--load-in-{self.quantization_bits}bit needs --lora-r > 0 (quantized "
                                           "weights are frozen: only LoRA adapters train on them)"]
        unavailable = quantization_problem(self.quantization_bits)
        return problems + ([unavailable] if unavailable else [])


def _looks_local(value: str) -> bool:
    """An explicit filesystem path (a hub id like ``org/name`` is not one)."""
    return value.startswith(("/", "./", "../", "~")) or value in (".", "..")


def check_data_flag(name: str, value: str, *, required: bool = True) -> list[str]:
    """Problems of a data flag (--data, --eval-data, --prompts) found without loading anything:
    missing when required, the grammar of dataset ids and mixtures, local parts that do not exist.
    Every config that reads data checks its data flags with this."""
    if not value:
        return [f"--{flag(name)} is required"] if required else []
    return [f"--{flag(name)}: {problem}" for problem in data_spec_problems(value)]


# --------------------------------------------------------------------------------------------
# The generator: dataclass -> argparse, YAML, validation, saving.
# --------------------------------------------------------------------------------------------


def flag(name: str) -> str:
    return name.replace("_", "-")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _converter(tp: Any):
    tp, _ = _unwrap_optional(tp)
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        return type(choices[0]), list(choices)
    if origin in (list, tuple):
        (inner,) = typing.get_args(tp)[:1]
        return inner, None
    return tp, None


def config_aliases(cls: type) -> dict[str, str]:
    """Former option name -> field name, from the ``aliases`` of the class's fields."""
    options = {f.name for f in dataclasses.fields(cls) if f.init}
    aliases: dict[str, str] = {}
    for f in dataclasses.fields(cls):
        for alias in f.metadata.get("aliases", ()) if f.init else ():
            if alias in options or alias in aliases:
                raise TypeError(f"{cls.__name__}: {alias!r}, an alias of {f.name!r}, is already an option")
            aliases[alias] = f.name
    return aliases


def _flag_kwargs(f: dataclasses.Field, tp: Any) -> dict[str, Any]:
    """How argparse reads an option of type ``tp`` (its type or action, choices, nargs)."""
    base, _ = _unwrap_optional(tp)
    if base is bool:
        return {"action": argparse.BooleanOptionalAction}
    conv, choices = _converter(tp)
    kwargs: dict[str, Any] = {"type": conv, "metavar": f.name.upper() if not choices else None}
    if choices:
        kwargs["choices"] = choices
    if typing.get_origin(base) in (list, tuple):  # `--x a b` and `--x a --x b` both give [a, b]
        kwargs.update(nargs="*", action="extend")
    return kwargs


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag per field of ``cls`` (kebab-case), with the field's help and choices, and
    a hidden flag per former name of a field (see :func:`arg`)."""
    hints = typing.get_type_hints(cls)
    config_aliases(cls)  # a clash between an alias and an option is a programming error: fail here
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = hints[f.name]
        help_text = f.metadata.get("help", "").replace("%", "%%")
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        if f.metadata.get("positional"):
            conv, choices = _converter(tp)
            parser.add_argument(f.name, type=conv, choices=choices, help=help_text,
                                nargs="?" if default not in (None, dataclasses.MISSING) else None,
                                default=argparse.SUPPRESS)
            continue
        kwargs = _flag_kwargs(f, tp)
        parser.add_argument(f"--{flag(f.name)}", dest=f.name, default=argparse.SUPPRESS,
                            help=f"{help_text} (default: {default!r})", **kwargs)
        for alias in f.metadata.get("aliases", ()):
            parser.add_argument(f"--{flag(alias)}", dest=alias, default=argparse.SUPPRESS, help=argparse.SUPPRESS,
                                **kwargs)
    parser.add_argument("--config", dest="__config_file", default=argparse.SUPPRESS,
                        help="A YAML file of values; flags given on the command line override it.")


def _blank(value: Any) -> bool:
    return value is None or value == "" or value == []


def _resolve_aliases(values: dict[str, Any], aliases: dict[str, str], source: str | None = None
                     ) -> tuple[dict[str, Any], list[str]]:
    """``values`` with every former option name replaced by its field's name.

    Prints one note per former name used (``source``: the config file they came from; None: the
    command line). The former and the new name with different values is a problem, unless one is
    blank (an older ppo config.yaml saved the spelling it did not use as '').
    """
    resolved = {key: value for key, value in values.items() if key not in aliases}
    problems = []
    for key, value in values.items():
        if key not in aliases:
            continue
        name = aliases[key]
        old, new = (f"--{flag(key)}", f"--{flag(name)}") if source is None else (key, name)
        where = "" if source is None else f"{source}: "
        print(f"note: {where}{old} is deprecated; use {new}", file=sys.stderr)
        if name in resolved and not _blank(resolved[name]) and not _blank(value) and resolved[name] != value:
            problems.append(f"{where}{old} {value!r} contradicts {new} {resolved[name]!r} "
                            f"({old} is its former name)")
        elif name not in resolved or _blank(resolved[name]):
            resolved[name] = value
    return resolved, problems


def _check_type(name: str, value: Any, tp: Any) -> tuple[Any, str | None]:
    base, optional = _unwrap_optional(tp)
    if value is None:
        return value, None if optional else f"{name}: must not be empty"
    origin = typing.get_origin(base)
    if origin is Literal:
        choices = typing.get_args(base)
        if value not in choices:
            return value, f"{name}: {value!r} is not one of {', '.join(map(str, choices))}"
        return value, None
    if origin in (list, tuple):
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return [value], None  # one value where a list is expected (a config.yaml saved when it was one)
        if not isinstance(value, (list, tuple)):
            return value, f"{name}: expected a list"
        return list(value), None
    if base is bool:
        if not isinstance(value, bool):
            return value, f"{name}: expected true or false, got {value!r}"
        return value, None
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value), None
    if base in (int, float, str) and (isinstance(value, bool) or not isinstance(value, base)):
        if base is not str and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:  # YAML reads `1e-5` as a string; numbers given as text are accepted
                converted = base(value)
                if base is int and isinstance(value, float) and converted != value:
                    raise ValueError
                return converted, None
            except (TypeError, ValueError):
                pass
        return value, f"{name}: expected {base.__name__}, got {value!r}"
    return value, None


def read_yaml_mapping(path: str, flag: str, keys: str) -> dict:
    """The mapping a YAML file holds; InputError naming ``flag`` (no such file) or the file (invalid
    YAML, or not a mapping of ``keys`` to values)."""
    try:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise InputError(f"{flag}: no such file: {path}") from None
    except yaml.YAMLError as e:
        raise InputError(f"{path}: invalid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(loaded, dict):
        raise InputError(f"{path}: expected a mapping of {keys} to values")
    return loaded


def build_config(cls: type, values: dict[str, Any], config_file: str | None = None):
    """Resolve defaults < YAML file < explicit values, type-check and validate.

    Raises :class:`InputError` listing every problem; nothing heavy has happened yet.
    """
    problems: list[str] = []
    merged: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    aliases = config_aliases(cls)
    if config_file:
        loaded = read_yaml_mapping(config_file, "--config", "option names")
        from_file = {}
        for key, value in loaded.items():
            key_name = str(key).replace("-", "_")
            if key_name not in names and key_name not in aliases:
                problems.append(f"{config_file}: unknown option '{key}'")
            else:
                from_file[key_name] = value
        merged, alias_problems = _resolve_aliases(from_file, aliases, config_file)
        problems += alias_problems
    given, alias_problems = _resolve_aliases(values, aliases)
    problems += alias_problems
    merged.update(given)
    for key in list(merged):
        merged[key], problem = _check_type(f"--{flag(key)}", merged[key], hints[key])
        if problem:  # validated below with its default instead, so that every problem is reported at once
            problems.append(problem)
            del merged[key]
    missing = [f.name for f in dataclasses.fields(cls)
               if f.init and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING and f.name not in merged]
    if missing:
        raise InputError(problems + [f"{flag(m)} is required" for m in missing])
    cfg = cls(**merged)
    try:
        validated(cfg)
    except InputError as e:
        problems += e.problems
    if problems:
        raise InputError(problems)
    return cfg


def validated(cfg: Any) -> Any:
    """``cfg`` itself, once its values have their declared types (converted where the command line
    would convert them) and its ``validate()`` finds no problem; otherwise :class:`InputError`
    listing every problem.

    Every command's ``main`` calls it first, so that a config built in Python
    (``main(Config(...))``) is checked like one from the command line, before any model is loaded.
    """
    hints = typing.get_type_hints(type(cfg))
    problems = []
    for f in dataclasses.fields(cfg):
        if f.init and getattr(cfg, f.name) is not f.default:  # a declared default is trusted
            value, problem = _check_type(f"--{flag(f.name)}", getattr(cfg, f.name), hints[f.name])
            if problem:
                problems.append(problem)
            else:
                setattr(cfg, f.name, value)  # the accepted conversions: 1 -> 1.0, "1e-5" -> 1e-05
    if not problems and hasattr(cfg, "validate"):
        problems = list(cfg.validate())
    if problems:
        raise InputError(problems)
    return cfg


def parse_config(cls: type, argv: list[str], prog: str = "rlhfkit") -> Any:
    """Parse ``argv`` into a validated ``cls`` instance (used by tests and the CLI)."""
    parser = argparse.ArgumentParser(prog=prog, description=(cls.__doc__ or "").strip())
    add_config_arguments(parser, cls)
    ns = vars(parser.parse_args(argv))
    config_file = ns.pop("__config_file", None)
    return build_config(cls, ns, config_file)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The fields a config file can set (``init=False`` fields are derived, not options)."""
    values = dataclasses.asdict(cfg)
    return {f.name: values[f.name] for f in dataclasses.fields(cfg) if f.init}


def save_config(cfg: Any, output_dir: str | os.PathLike) -> Path:
    """Write the resolved config as ``config.yaml`` (it can be passed back with ``--config``)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.yaml"
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    os.replace(tmp, path)
    return path
