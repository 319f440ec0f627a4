"""``rlhfkit eval-frontier --x-reward X --y-reward Y`` on a tiny PPO run: one point per checkpoint (the
reference as step 0), each at the means of the two rewards of the same samples the reward-vs-KL
frontier scores, and the plot written."""

from __future__ import annotations

import json

from core_helpers import TOY_REWARDS, write_jsonl, write_text


def test_the_two_reward_plane_has_a_point_per_checkpoint(run_cli, one_thread, tiny_lm, tmp_path):
    rewards = write_text(tmp_path / "rewards.py", TOY_REWARDS)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"say something {i}"} for i in range(6)])
    run = tmp_path / "ppo"
    result = run_cli("ppo", "--model", tiny_lm, "--reward", f"{rewards}:lower", "--prompts", prompts,
                     "--output", run, "--max-new-tokens", 6, "--no-progress", "--max-steps", 2,
                     "--batch-size", 3, "--save-steps", 1, "--lr", "3e-3", "--seed", 1)
    assert result.code == 0, result.err
    common = ["--run", run, "--limit", 6, "--max-new-tokens", 6, "--samples-per-prompt", 2]
    result = run_cli("eval-frontier", *common, "--x-reward", f"{rewards}:lower", "--y-reward", f"{rewards}:length",
                     "--output", tmp_path / "plane")
    assert result.code == 0, result.err
    assert "step 1: KL" in result.out and ", x " in result.out and ", y " in result.out  # the axes, not reward/oracle
    assert "oracle" not in result.out
    plane = json.loads((tmp_path / "plane" / "plane.json").read_text())
    assert [p["step"] for p in plane["points"]] == [0, 1, 2]
    assert plane["x_reward"].endswith(":lower") and plane["y_reward"].endswith(":length") and plane["prompts"] == 6
    # the same samples (same seed) as the reward-vs-KL frontier with the x reward as its reward, y as its oracle
    assert run_cli("eval-frontier", *common, "--reward", f"{rewards}:lower", "--oracle", f"{rewards}:length",
                   "--output", tmp_path / "frontier").code == 0
    frontier = json.loads((tmp_path / "frontier" / "frontier.json").read_text())["points"]
    assert [(p["x"], p["y"], p["kl"]) for p in plane["points"]] == [(p["reward"], p["oracle"], p["kl"])
                                                                    for p in frontier]
    for p in plane["points"]:
        assert 0.0 <= p["x"] <= 1.0 and p["y"] > 0.0
    assert (tmp_path / "plane" / "plane.png").stat().st_size > 1000
    table = (tmp_path / "plane" / "plane.md").read_text()
    assert "| step | x: rewards.py:lower | y: rewards.py:length | KL (nats) |" in table
    last = plane["points"][-1]
    assert f"| 2 | {last['x']:.4g} | {last['y']:.4g} | {last['kl']:.3f} |" in table
    assert not (tmp_path / "plane" / "frontier.json").exists()


def test_one_axis_alone_is_refused(run_cli, tmp_path):
    run = tmp_path / "run"
    write_text(run / "config.yaml", "model: x\n")
    for extra in (["--x-reward", "r.py:f"], ["--x-reward", "r.py:f", "--y-reward", "r.py:g", "--oracle", "r.py:h"]):
        result = run_cli("eval-frontier", "--run", run, *extra)
        assert result.code == 2
        assert result.errors == ["error: --x-reward and --y-reward go together, and replace --reward and --oracle"]
