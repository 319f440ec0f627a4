"""``rlhfkit eval-frontier`` on a tiny PPO run: one point per saved policy plus the reference,
KL 0 at the reference and non-negative estimates elsewhere, table, JSON and PNG written."""

from __future__ import annotations

import json

from core_helpers import TOY_REWARDS, write_jsonl, write_text


def test_frontier_over_ppo_checkpoints(run_cli, one_thread, tiny_lm, tmp_path):
    reward = write_text(tmp_path / "reward.py", TOY_REWARDS)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"say something {i}"} for i in range(8)])
    run = tmp_path / "ppo"
    result = run_cli("ppo", "--model", tiny_lm, "--reward", f"{reward}:lower", "--prompts", prompts,
                     "--output", run, "--max-new-tokens", 8, "--no-progress", "--max-steps", 2,
                     "--batch-size", 4, "--save-steps", 1, "--lr", "3e-3", "--seed", 1)
    assert result.code == 0, result.err
    result = run_cli("eval-frontier", "--run", run, "--oracle", f"{reward}:length", "--limit", 8,
                     "--max-new-tokens", 8, "--samples-per-prompt", 2)
    assert result.code == 0, result.err
    data = json.loads((run / "frontier" / "frontier.json").read_text())
    steps = [p["step"] for p in data["points"]]
    assert steps == [0, 1, 2]
    assert data["points"][0]["kl"] == 0.0
    for point in data["points"]:
        assert 0.0 <= point["reward"] <= 1.0
        assert point["oracle"] >= 0.0
    assert data["reward"].endswith(":lower")
    assert (run / "frontier" / "frontier.png").stat().st_size > 1000
    assert "| step |" in (run / "frontier" / "frontier.md").read_text()


def test_frontier_rejects_a_folder_that_is_not_a_run(run_cli, tmp_path):
    result = run_cli("eval-frontier", "--run", tmp_path)
    assert result.code == 2
    assert "not an rlhfkit run folder" in result.err


def test_completion_logps_use_the_sampling_temperature(tiny_lm):
    """The KL of samples drawn at temperature T compares softmax(logits / T) of both models: the
    sequence log-prob API scores at T on both of its paths (the fused packed head and padded rows)."""
    import torch
    from transformers import AutoModelForCausalLM

    from rlhfkit.models.packed import Group, completion_logps

    model = AutoModelForCausalLM.from_pretrained(tiny_lm).eval()
    prompt, response = [3, 4, 5], [6, 7]
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0].float()
        for temperature in (1.0, 0.7):
            logp = torch.log_softmax(logits / temperature, dim=-1)
            expected = float(logp[2, 6] + logp[3, 7])   # position t predicts token t + 1
            for packed in (True, False):
                got = completion_logps(model, [Group(prompt, [response])], packed=packed,
                                       temperature=temperature).logps
                assert abs(float(got[0]) - expected) < 1e-5, (temperature, packed)
