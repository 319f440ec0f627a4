"""The typed config framework: flags generated from the dataclass, YAML files, type checks,
validation, and the saved config.yaml round trip."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest
import yaml

from rlhfkit.config import TrainConfig, add_config_arguments, build_config, parse_config, save_config
from rlhfkit.errors import InputError
from rlhfkit.recipes import rm as rm_recipe
from rlhfkit.recipes import sft as sft_recipe

pytestmark = pytest.mark.usefixtures("one_thread")


def _parser(cls) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="test")
    add_config_arguments(parser, cls)
    return parser


@pytest.fixture
def data_file(tmp_path) -> str:
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n')
    return str(path)


def _base(data_file, tmp_path) -> list[str]:
    return ["--data", data_file, "--output", str(tmp_path / "out")]


@pytest.mark.parametrize("cls", [TrainConfig, sft_recipe.Config, rm_recipe.Config])
def test_every_field_has_a_kebab_case_flag_with_its_documentation(cls):
    parser = _parser(cls)
    options = parser._option_string_actions
    for f in dataclasses.fields(cls):
        option = "--" + f.name.replace("_", "-")
        assert option in options, f"no flag for field {f.name}"
        assert f.metadata["help"], f"field {f.name} is undocumented"
        assert options[option].help.startswith(f.metadata["help"])
        assert "_" not in option
    # the flags the issue names, by their exact spelling
    for option in ("--model", "--data", "--eval-data", "--output", "--epochs", "--max-steps", "--batch-size",
                   "--grad-accum", "--lr", "--warmup-ratio", "--max-length", "--seed", "--logging-steps",
                   "--save-steps", "--resume", "--lora-r", "--lora-alpha", "--lora-targets", "--dtype",
                   "--report-to", "--config"):
        assert option in options
    assert options["--dtype"].choices == ["float32", "bfloat16"]
    assert options["--report-to"].choices == ["none", "tensorboard", "wandb"]


def test_flags_are_parsed_into_typed_values(data_file, tmp_path):
    cfg = parse_config(sft_recipe.Config, _base(data_file, tmp_path) + [
        "--max-steps", "7", "--lr", "3e-4", "--epochs", "2", "--dtype", "bfloat16", "--no-progress",
        "--resume", "--lora-r", "8", "--lora-targets", "q_proj,v_proj", "--packing"])
    assert isinstance(cfg, sft_recipe.Config)
    assert (cfg.max_steps, cfg.lr, cfg.epochs, cfg.dtype) == (7, 3e-4, 2.0, "bfloat16")
    assert type(cfg.max_steps) is int and type(cfg.lr) is float and type(cfg.epochs) is float
    assert (cfg.progress, cfg.resume, cfg.packing, cfg.lora_r, cfg.lora_targets) == (
        False, True, True, 8, "q_proj,v_proj")
    # untouched fields keep the dataclass defaults (the recipe's own, not TrainConfig's)
    assert cfg.batch_size == 8 and cfg.lr != TrainConfig.lr and cfg.logging_steps == 1
    assert parse_config(rm_recipe.Config, _base(data_file, tmp_path)).model == "minilm-l6"


def test_yaml_file_with_flags_overriding_it(data_file, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "data": data_file, "output": str(tmp_path / "o"), "batch_size": 3, "grad-accum": 2,
        "max_steps": 11, "lr": "1e-4",  # YAML 1.1 reads 1e-4 as a string: accepted as a number
        "lora_r": 4}))
    cfg = parse_config(sft_recipe.Config, ["--config", str(config), "--batch-size", "5", "--lora-r", "0"])
    assert cfg.batch_size == 5          # the flag wins
    assert cfg.lora_r == 0              # ... even when it sets the default value
    assert cfg.grad_accum == 2          # kebab-case keys work in the file too
    assert cfg.max_steps == 11 and cfg.lr == pytest.approx(1e-4) and isinstance(cfg.lr, float)
    assert cfg.data == data_file


@pytest.mark.parametrize("content, message", [
    ({"batch_sz": 4}, "unknown option 'batch_sz'"),
    ({"batch_size": "four"}, "--batch-size: expected int, got 'four'"),
    ({"batch_size": 2.5}, "--batch-size: expected int, got 2.5"),
    ({"batch_size": True}, "--batch-size: expected int, got True"),
    ({"lr": "fast"}, "--lr: expected float, got 'fast'"),
    ({"resume": "yes"}, "--resume: expected true or false, got 'yes'"),
    ({"dtype": "float16"}, "--dtype: 'float16' is not one of float32, bfloat16"),
    ({"model": ["a", "b"]}, "--model: expected str"),
    ({"max_steps": None}, "--max-steps: must not be empty"),
])
def test_yaml_unknown_keys_and_bad_types_are_rejected(tmp_path, data_file, content, message):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(content))
    with pytest.raises(InputError) as e:
        parse_config(sft_recipe.Config, ["--config", str(config)] + _base(data_file, tmp_path))
    assert any(message in p for p in e.value.problems), e.value.problems
    if "unknown" in message:
        assert str(config) in e.value.problems[0]


def test_yaml_that_is_not_a_mapping_or_not_yaml(tmp_path, data_file):
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(InputError, match="expected a mapping"):
        parse_config(sft_recipe.Config, ["--config", str(listing)])
    broken = tmp_path / "broken.yaml"
    broken.write_text("batch_size: [1, 2\n")
    with pytest.raises(InputError, match="invalid YAML"):
        parse_config(sft_recipe.Config, ["--config", str(broken)])
    with pytest.raises(InputError, match="no such file"):
        parse_config(sft_recipe.Config, ["--config", str(tmp_path / "missing.yaml")])


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "0"], "--batch-size must be >= 1 (got 0)"),
    (["--grad-accum", "-1"], "--grad-accum must be >= 1 (got -1)"),
    (["--max-length", "0"], "--max-length must be >= 1"),
    (["--max-steps", "-3"], "--max-steps must be >= 0 (got -3)"),
    (["--lr", "0"], "--lr must be > 0"),
    (["--warmup-ratio", "1.5"], "--warmup-ratio must be in [0, 1) (got 1.5)"),
    (["--epochs", "0"], "--epochs must be > 0 when --max-steps is 0"),
    (["--merge-lora"], "--merge-lora needs --lora-r > 0"),
    (["--max-grad-norm", "-1"], "--max-grad-norm must be >= 0"),
    (["--eval-data", "/nonexistent/e.jsonl"], "--eval-data: no such file or directory: /nonexistent/e.jsonl"),
])
def test_invalid_and_inconsistent_values(data_file, tmp_path, flags, message):
    with pytest.raises(InputError) as e:
        parse_config(sft_recipe.Config, _base(data_file, tmp_path) + flags)
    assert len(e.value.problems) == 1 and e.value.problems[0].startswith(message), e.value.problems


def test_every_problem_is_reported_at_once(tmp_path):
    with pytest.raises(InputError) as e:
        parse_config(rm_recipe.Config, ["--batch-size", "0", "--lr", "-1", "--ranking-loss", "best"])
    problems = e.value.problems
    assert "--data is required" in problems and "--output is required" in problems
    assert "--batch-size must be >= 1 (got 0)" in problems
    assert any(p.startswith("--lr must be > 0") for p in problems)
    assert any("--ranking-loss" in p and "'best'" in p for p in problems)
    assert len(problems) == 5


def test_epochs_may_be_zero_when_max_steps_is_set(data_file, tmp_path):
    cfg = parse_config(sft_recipe.Config, _base(data_file, tmp_path) + ["--epochs", "0", "--max-steps", "3"])
    assert cfg.max_steps == 3


@pytest.mark.parametrize("cls", [sft_recipe.Config, rm_recipe.Config])
def test_saved_config_yaml_loads_back_to_the_same_config(cls, data_file, tmp_path):
    cfg = parse_config(cls, _base(data_file, tmp_path) + ["--batch-size", "3", "--lr", "1e-3", "--lora-r", "2",
                                                          "--merge-lora", "--no-progress", "--dtype", "bfloat16"])
    path = save_config(cfg, tmp_path / "saved")
    assert path == Path(tmp_path / "saved" / "config.yaml")
    saved = yaml.safe_load(path.read_text())
    assert saved["batch_size"] == 3 and saved["merge_lora"] is True and saved["lr"] == 1e-3
    assert set(saved) == {f.name for f in dataclasses.fields(cls)}
    assert parse_config(cls, ["--config", str(path)]) == cfg
    assert not list((tmp_path / "saved").glob("*.tmp"))


def test_build_config_reports_required_fields_without_defaults():
    @dataclasses.dataclass
    class Needs:
        name: str = dataclasses.field(metadata={"help": "x"})
        count: int = dataclasses.field(default=1, metadata={"help": "y"})

    with pytest.raises(InputError) as e:
        build_config(Needs, {"count": 2})
    assert e.value.problems == ["name is required"]
    assert build_config(Needs, {"name": "a"}) == Needs("a", 1)
