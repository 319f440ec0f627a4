"""The one entry point: command listing, every command's --help, exit code 2 on bad values before
any model is loaded, config.yaml written and reusable with --config."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from core_helpers import REPO, read_metrics
from rlhfkit.cli import COMMANDS, main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name, (_, description) in COMMANDS.items():
        top = name.split(" ")[0]
        assert f"    {top} " in out or f"    {top}\n" in out, f"{top} missing from rlhfkit --help"
        if " " not in name:
            assert description.split(" ")[0] in out
    assert main([]) == 0
    assert capsys.readouterr().out == out


def test_help_of_a_group_lists_its_subcommands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["label", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        if name.startswith("label "):
            assert name.split(" ", 1)[1] in out


def test_console_entry_point_runs_as_a_module():
    """``python -m rlhfkit --help`` (what the console script calls) exits 0 and lists commands."""
    result = subprocess.run([sys.executable, "-m", "rlhfkit", "--help"], capture_output=True, text=True,
                            cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "sft" in result.stdout and "inspect-data" in result.stdout


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_has_a_working_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        main(name.split(" ") + ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: rlhfkit {name}")
    assert "--config" in out


def test_unknown_command_exits_2(capsys):
    assert main(["nonsense"]) == 2
    assert "unknown command 'nonsense'" in capsys.readouterr().err


def test_unknown_flag_and_unparsable_value_exit_2(capsys, tmp_path):
    for argv in (["sft", "--no-such-flag"], ["sft", "--batch-size", "four"], ["rm", "--dtype", "float64"],
                 ["rm", "--ranking-loss", "best-of"], ["demo", "--sample-dtype", "float16"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(f"usage: rlhfkit {argv[0]}")


@pytest.mark.parametrize("command, flags, message", [
    ("sft", ["--batch-size", "0"], "error: --batch-size must be >= 1 (got 0)"),
    ("sft", ["--merge-lora"], "error: --merge-lora needs --lora-r > 0"),
    ("sft", ["--warmup-ratio", "1"], "error: --warmup-ratio must be in [0, 1) (got 1.0)"),
    ("rm", ["--lr", "0"], "error: --lr must be > 0 (got 0.0)"),
    ("rm", ["--eval-data", "missing.jsonl"], "error: --eval-data: no such file or directory: missing.jsonl"),
])
def test_bad_values_exit_2_before_any_model_is_loaded(run_cli, no_model_loading, sft_toy, tiny_lm, tmp_path,
                                                      command, flags, message):
    out = tmp_path / "out"
    result = run_cli(command, "--model", tiny_lm, "--data", sft_toy, "--output", out, *flags)
    assert result.code == 2
    assert result.errors == [message]
    assert "Traceback" not in result.err
    assert no_model_loading == []
    assert not out.exists(), "nothing is written for a rejected config"


def test_a_bad_yaml_config_exits_2(run_cli, no_model_loading, tmp_path, sft_toy):
    config = tmp_path / "c.yaml"
    config.write_text("data: x\nbatch_size: lots\nwarp_speed: 9\n")
    result = run_cli("sft", "--config", config, "--output", tmp_path / "o")
    assert result.code == 2
    assert f"error: {config}: unknown option 'warp_speed'" in result.errors
    assert "error: --batch-size: expected int, got 'lots'" in result.errors
    assert no_model_loading == []


def test_missing_data_file_exits_2(run_cli, no_model_loading, tmp_path):
    result = run_cli("sft", "--data", tmp_path / "nope.jsonl", "--output", tmp_path / "o")
    assert result.code == 2
    assert result.errors == [f"error: --data: no such file or directory: {tmp_path / 'nope.jsonl'}"]


def test_saved_config_reruns_with_config_flag(run_cli, tiny_lm, sft_toy, tmp_path):
    first = tmp_path / "first"
    result = run_cli("sft", "--model", tiny_lm, "--data", sft_toy, "--output", first, "--max-steps", "2",
                     "--batch-size", "2", "--lr", "1e-3", "--no-progress")
    assert result.code == 0, result.err
    saved = yaml.safe_load((first / "config.yaml").read_text())
    assert saved["max_steps"] == 2 and saved["batch_size"] == 2 and saved["model"] == tiny_lm
    assert saved["lr"] == 1e-3 and saved["output"] == str(first)

    second = tmp_path / "second"
    result = run_cli("sft", "--config", first / "config.yaml", "--output", second)
    assert result.code == 0, result.err
    again = yaml.safe_load((second / "config.yaml").read_text())
    assert again == {**saved, "output": str(second)}
    # same config, same seed: the same run
    assert [r["loss"] for r in read_metrics(first)] == pytest.approx([r["loss"] for r in read_metrics(second)],
                                                                     abs=1e-6)


# Per command: a config built in Python that its validation refuses, and one problem it reports.
INVALID_IN_PYTHON = {
    "demo": ({"annotator_temperature": 0.0}, "--annotator-temperature must be > 0"),
    "sft": ({"output": "{out}"}, "--data is required"),
    "rm": ({"output": "{out}", "data": "{missing}"}, "--data: no such file or directory"),
    "inspect-data": ({}, "--data is required"),
    "prm": ({"output": "{out}", "data": "{missing}", "step_separator": ""}, "--step-separator must not be empty"),
    "ppo": ({"output": "{out}", "reward": "{missing}.py:f"}, "--prompts is required"),
    "dpo": ({"output": "{out}", "beta": 0.0}, "--beta must be > 0"),
    "kto": ({"output": "{out}", "data": "{missing}", "batch_size": 1}, "--batch-size and --eval-batch-size must be"),
    "offline-rl": ({"output": "{out}", "data": "{missing}", "clip": 1.5}, "--clip must be in (0, 1)"),
    "generate": ({"output": "{out}", "prompts": "{missing}"}, "--prompts: no such file or directory"),
    "rejection-sampling": ({"output": "{out}"}, "--prompts is required"),
    "loop": ({"output": "{out}", "plan": "{missing}"}, "--plan: no such file"),
    "serve": ({"port": 70000}, "--port must be in 0..65535"),
    "eval-rm": ({"model": "m"}, "--model and --ref-model go together"),
    "judge": ({"output": "{out}"}, "no candidates"),
    "arena": ({"output": "{out}"}, "--battles is required"),
    "eval-bench": ({"output": "{out}", "limit": -1}, "--tasks or --suite is required"),
    "eval-frontier": ({"samples_per_prompt": 0}, "--run is required"),
    "eval-safety": ({"samples_per_prompt": 2}, "--output is required"),
    "cai-revise": ({"rounds": 0}, "--output is required"),
    "ai-label": ({"output": "{out}", "data": "{missing}"}, "--data: no such file or directory"),
    "self-instruct": ({"output": "{out}", "seed_tasks": "{missing}"}, "--seed-tasks: no such file or directory"),
    "templatize": ({"output": "{out}", "data": "{missing}"}, "--data: no such file or directory"),
    "label serve": ({"port": -1}, "--port must be in 0..65535"),
    "label add-user": ({"name": " "}, "NAME is required"),
    "label import": ({"file": "{missing}"}, "no such file"),
    "label export": ({"db": "{missing}"}, "--output is required"),
    "feedback export": ({"db": "{missing}", "output": "{out}"}, "--db: no such file"),
}


def test_every_command_is_listed_for_the_validation_test():
    assert set(INVALID_IN_PYTHON) == set(COMMANDS)


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_main_validates_a_config_built_in_python(name, no_model_loading, tmp_path, monkeypatch):
    """``main(Config(...))`` refuses a bad config before it loads a model or writes anything."""
    from rlhfkit.cli import _load
    from rlhfkit.errors import InputError

    monkeypatch.chdir(tmp_path)
    config_cls, run = _load(COMMANDS[name][0])
    values, message = INVALID_IN_PYTHON[name]
    paths = {"out": str(tmp_path / "out"), "missing": str(tmp_path / "missing.jsonl")}
    cfg = config_cls(**{k: v.format(**paths) if isinstance(v, str) else v for k, v in values.items()})
    with pytest.raises(InputError) as e:
        run(cfg)
    assert any(message in p for p in e.value.problems), e.value.problems
    assert no_model_loading == []
    assert list(tmp_path.iterdir()) == []
