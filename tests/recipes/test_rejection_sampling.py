"""`rlhfkit rejection-sampling` on a tiny random model and a hand-written reward."""

from __future__ import annotations

import json

import pytest

from rlhfkit.cli import main as cli
from rlhfkit.models.loading import load_causal_lm
from rlhfkit.models.tiny import make_tiny_causal_lm
from rlhfkit.recipes.rejection_sampling import Samples, keep_best
from rlhfkit.training import read_metrics

REWARD = '''
def lowercase(prompts, completions):
    """Fraction of ASCII lowercase letters: rare under a random byte-level model."""
    return [sum("a" <= ch <= "z" for ch in text) / max(len(text), 1) for text in completions]
'''


def test_keep_best_takes_the_top_k_first_on_ties():
    samples = Samples([[1]], [[[1], [2], [3], [4]]], [["a", "b", "c", "d"]], [[0.1, 0.9, 0.5, 0.9]])
    assert keep_best(samples, 1) == [[1]]
    assert keep_best(samples, 3) == [[1, 3, 2]]


def test_a_round_raises_the_mean_reward(tmp_path):
    tiny = make_tiny_causal_lm(tmp_path / "tiny", seed=0)
    (tmp_path / "reward.py").write_text(REWARD)
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"prompt {i}"}) + "\n" for i in range(8)))
    out = tmp_path / "out"
    code = cli(["rejection-sampling", "--policy", tiny, "--reward", f"{tmp_path / 'reward.py'}:lowercase",
                "--prompts", str(tmp_path / "prompts.jsonl"), "--rounds", "1", "--n", "8", "--output", str(out),
                "--lr", "1e-2", "--epochs", "6", "--batch-size", "4", "--max-new-tokens", "16", "--no-progress"])
    assert code == 0
    initial, round1 = read_metrics(out)
    assert initial["round"] == 0 and round1["round"] == 1
    assert round1["reward/mean_all"] == pytest.approx(initial["reward/mean_policy"])
    assert round1["reward/mean_kept"] > round1["reward/mean_all"]
    assert round1["reward/mean_policy"] > initial["reward/mean_policy"]  # the point of the method
    assert round1["objective/kl"] > 0
    folder = out / "round-1"
    assert (folder / "round.json").exists() and (folder / "sft.jsonl").exists()
    assert len((folder / "sft.jsonl").read_text().splitlines()) == 8
    assert not list(folder.glob("checkpoint-*"))
    assert load_causal_lm(str(folder)).config.model_type == "llama"
