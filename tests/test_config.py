"""The typed config framework: flags generated from the dataclass, YAML files, type checks,
validation, and the saved config.yaml round trip."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest
import yaml

from rlhfkit.config import TrainConfig, add_config_arguments, arg, build_config, parse_config, save_config
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
    config = tmp_path / "c.yaml"
    config.write_text("ranking_loss: best\n")  # on the command line, argparse itself refuses a choice
    with pytest.raises(InputError) as e:
        parse_config(rm_recipe.Config, ["--batch-size", "0", "--lr", "-1", "--config", str(config)])
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


# ------------------------------------------------------------------------- former flag names


@dataclasses.dataclass
class Renamed:
    """A command whose flags were renamed: --policy is now --model, --n --samples-per-prompt."""

    model: str = arg("m0", "The model.", aliases=("policy",))
    samples_per_prompt: int = arg(1, "Completions per prompt.", aliases=("n",))
    seed: int = arg(0, "Seed.")

    def validate(self) -> list[str]:
        return [] if self.samples_per_prompt >= 1 else ["--samples-per-prompt must be >= 1"]


def test_a_former_flag_sets_the_new_field_with_one_note(capsys):
    cfg = parse_config(Renamed, ["--policy", "p", "--n", "3"])
    assert (cfg.model, cfg.samples_per_prompt) == ("p", 3)
    assert capsys.readouterr().err.splitlines() == ["note: --policy is deprecated; use --model",
                                                    "note: --n is deprecated; use --samples-per-prompt"]
    assert parse_config(Renamed, ["--model", "p"]).model == "p"
    assert capsys.readouterr().err == ""  # the new names print nothing
    with pytest.raises(InputError) as e:  # the former name is validated as the new one
        parse_config(Renamed, ["--n", "0"])
    assert e.value.problems == ["--samples-per-prompt must be >= 1"]


def test_former_flags_are_hidden_from_help():
    text = _parser(Renamed).format_help()
    assert "--model" in text and "--samples-per-prompt" in text
    assert "--policy" not in text and "--n " not in text and "--n\n" not in text


def test_a_former_and_a_new_flag_that_disagree_are_an_error(capsys):
    with pytest.raises(InputError) as e:
        parse_config(Renamed, ["--policy", "a", "--model", "b"])
    assert e.value.problems == ["--policy 'a' contradicts --model 'b' (--policy is its former name)"]
    assert parse_config(Renamed, ["--policy", "a", "--model", "a"]).model == "a"  # agreeing is fine


def test_a_former_flag_that_contradicts_its_new_name_exits_2(run_cli, no_model_loading, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a"}\n')
    result = run_cli("generate", "--prompts", prompts, "--output", tmp_path / "o.jsonl", "--n", "2",
                     "--samples-per-prompt", "3")
    assert result.code == 2
    assert result.errors == ["error: --n 2 contradicts --samples-per-prompt 3 (--n is its former name)"]
    assert "note: --n is deprecated; use --samples-per-prompt" in result.err
    assert no_model_loading == []


def test_a_former_key_in_a_config_file(tmp_path, capsys):
    config = tmp_path / "old.yaml"
    config.write_text("policy: p\nn: 2\n")
    cfg = parse_config(Renamed, ["--config", str(config)])
    assert (cfg.model, cfg.samples_per_prompt) == ("p", 2)
    assert capsys.readouterr().err.splitlines() == [f"note: {config}: policy is deprecated; use model",
                                                    f"note: {config}: n is deprecated; use samples_per_prompt"]
    assert parse_config(Renamed, ["--config", str(config), "--model", "q"]).model == "q"  # the flag still wins
    config.write_text("policy: p\nmodel: q\n")
    with pytest.raises(InputError) as e:
        parse_config(Renamed, ["--config", str(config)])
    assert e.value.problems == [f"{config}: policy 'p' contradicts model 'q' (policy is its former name)"]


def test_a_ppo_config_yaml_of_the_former_version_still_loads(tmp_path):
    """It saved both spellings, the unused one blank: policy/model, prompts/data, rollout_batch_size."""
    from rlhfkit.recipes import ppo

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a"}\n')
    reward = tmp_path / "r.py"
    reward.write_text("def f(prompts, completions):\n    return [0.0] * len(completions)\n")
    old = {"policy": "smollm2-135m", "model": "", "prompts": str(prompts), "data": "", "reward": f"{reward}:f",
           "output": str(tmp_path / "o"), "rollout_batch_size": 4, "samples_per_prompt": 2}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(old))
    cfg = parse_config(ppo.Config, ["--config", str(config)])
    assert (cfg.model, cfg.prompts, cfg.generation_batch_size) == ("smollm2-135m", str(prompts), 4)
    saved = yaml.safe_load(save_config(cfg, tmp_path / "again").read_text())
    assert saved["model"] == "smollm2-135m" and saved["generation_batch_size"] == 4
    assert not {"policy", "data", "rollout_batch_size"} & set(saved)  # saved with the new names only
    assert parse_config(ppo.Config, ["--config", str(tmp_path / "again" / "config.yaml")]) == cfg


def test_an_alias_that_is_also_an_option_is_a_programming_error():
    @dataclasses.dataclass
    class Clash:
        model: str = arg("", "x", aliases=("seed",))
        seed: int = arg(0, "y")

    with pytest.raises(TypeError, match="'seed', an alias of 'model', is already an option"):
        _parser(Clash)


def test_validated_checks_a_config_built_in_python():
    from rlhfkit.config import validated

    cfg = Renamed(model="x", samples_per_prompt=2)
    assert validated(cfg) is cfg
    with pytest.raises(InputError) as e:
        validated(Renamed(samples_per_prompt=0))
    assert e.value.problems == ["--samples-per-prompt must be >= 1"]
    with pytest.raises(InputError) as e:  # types too, as on the command line
        validated(Renamed(samples_per_prompt="two", seed=1.5))
    assert e.value.problems == ["--samples-per-prompt: expected int, got 'two'", "--seed: expected int, got 1.5"]
    assert validated(Renamed(samples_per_prompt="2")).samples_per_prompt == 2  # converted as a flag's text is
