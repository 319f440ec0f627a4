"""`rlhfkit rejection-sampling` on a tiny random model and a hand-written reward."""

from __future__ import annotations

import json

import pytest

from core_helpers import read_metrics
from rlhfkit.cli import main as cli
from rlhfkit.models.loading import load_causal_lm
from rlhfkit.models.tiny import make_tiny_causal_lm
from rlhfkit.recipes.rejection_sampling import Samples, keep_best

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
    code = cli(["rejection-sampling", "--model", tiny, "--reward", f"{tmp_path / 'reward.py'}:lowercase",
                "--prompts", str(tmp_path / "prompts.jsonl"), "--rounds", "1", "--samples-per-prompt", "8",
                "--output", str(out),
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


def test_train_returns_the_rounds_and_the_final_policy(tmp_path):
    from rlhfkit.recipes import rejection_sampling
    from rlhfkit.training import start_run

    tiny = make_tiny_causal_lm(tmp_path / "tiny", seed=0)
    (tmp_path / "reward.py").write_text(REWARD)
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"prompt {i}"}) + "\n" for i in range(4)))
    out = tmp_path / "out"
    cfg = rejection_sampling.Config(model=tiny, reward=f"{tmp_path / 'reward.py'}:lowercase",
                                    prompts=str(tmp_path / "prompts.jsonl"), rounds=2, output=str(out),
                                    max_new_tokens=4, batch_size=4, progress=False)
    with start_run(cfg) as run:
        result = rejection_sampling.train(cfg, run)
    assert result.rounds == [out / "round-1", out / "round-2"] and result.final_model == out / "round-2"
    assert result.final_samples == out / "final_samples.jsonl" and result.final_samples.exists()
    assert [r["round"] for r in result.history] == [0, 1, 2] and result.history == read_metrics(out)
    assert result.metrics["sft/loss"] == read_metrics(out / "round-2")[-1]["loss"]
    assert result.checkpoints == []


def test_former_flag_names_set_the_new_fields_and_keep_top_is_checked(tmp_path, capsys):
    from rlhfkit.config import parse_config
    from rlhfkit.errors import InputError
    from rlhfkit.recipes.rejection_sampling import Config

    (tmp_path / "reward.py").write_text(REWARD)
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": "p"}) + "\n")
    common = ["--reward", f"{tmp_path / 'reward.py'}:lowercase", "--prompts", str(tmp_path / "prompts.jsonl"),
              "--output", str(tmp_path / "o")]
    cfg = parse_config(Config, [*common, "--policy", "m", "--n", "6", "--top-k", "2", "--gen-batch-size", "3"])
    assert (cfg.model, cfg.samples_per_prompt, cfg.keep_top, cfg.generation_batch_size) == ("m", 6, 2, 3)
    assert cfg.sampling_params(0).n == 6 and cfg.sampling_params(0).top_k == 0  # --top-k here never meant sampling
    assert len(capsys.readouterr().err.splitlines()) == 4
    with pytest.raises(InputError) as e:
        parse_config(Config, [*common, "--samples-per-prompt", "2", "--keep-top", "3"])
    assert e.value.problems == ["--keep-top 3 keeps more than the --samples-per-prompt 2 samples"]


def test_two_rewards_keep_the_best_by_the_combined_score(tmp_path):
    """--reward twice with --reward-weight: the round's samples carry the combined score (worked here
    from each reward on the same completions) and sft.jsonl keeps its argmax."""
    from rlhfkit.rl.rewards import load_reward

    tiny = make_tiny_causal_lm(tmp_path / "tiny", seed=0)
    (tmp_path / "reward.py").write_text(REWARD + "\n\ndef short(prompts, completions):\n"
                                        "    return [-len(t) / 8 for t in completions]\n")
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"prompt {i}"}) + "\n" for i in range(3)))
    out = tmp_path / "out"
    code = cli(["rejection-sampling", "--model", tiny, "--reward", f"{tmp_path / 'reward.py'}:lowercase",
                "--reward", f"{tmp_path / 'reward.py'}:short", "--reward-weight", "1", "--reward-weight", "0.5",
                "--prompts", str(tmp_path / "prompts.jsonl"), "--rounds", "1", "--samples-per-prompt", "4",
                "--output", str(out), "--max-new-tokens", "8", "--batch-size", "4", "--no-progress"])
    assert code == 0
    lower, short = load_reward(f"{tmp_path / 'reward.py'}:lowercase"), load_reward(f"{tmp_path / 'reward.py'}:short")
    rows = [json.loads(l) for l in (out / "round-1" / "samples.jsonl").read_text().splitlines()]
    kept = [json.loads(l)["completion"] for l in (out / "round-1" / "sft.jsonl").read_text().splitlines()]
    best = []
    for row in rows:
        texts = row["completions"]
        by_hand = [a + 0.5 * b for a, b in zip(lower(["p"] * 4, texts), short(["p"] * 4, texts))]
        assert row["scores"] == pytest.approx(by_hand)
        best.append(texts[max(range(4), key=lambda i: (by_hand[i], -i))])
    assert kept == [t for t in best if t.strip()]


def test_bad_reward_combinations_exit_2_before_loading(tmp_path, capsys, no_model_loading):
    (tmp_path / "reward.py").write_text(REWARD)
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": "p"}) + "\n")
    code = cli(["rejection-sampling", "--model", "x", "--reward", f"{tmp_path / 'reward.py'}:lowercase",
                "--reward-weight", "1", "--reward-weight", "2", "--reward-gate", "helpful:0",
                "--prompts", str(tmp_path / "prompts.jsonl"), "--output", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err
    assert "--reward-weight: 2 weight(s) for 1 reward(s)" in err and "no reward named 'helpful'" in err
    assert no_model_loading == []
