"""Best-of-N and `rlhfkit generate` through the real CLI."""

from __future__ import annotations

import json

import pytest

from rlhfkit.cli import main as cli
from rlhfkit.generation.best_of_n import BestOfN, argmax, best_of_n
from rlhfkit.generation.decoding import SamplingParams
from rlhfkit.models.loading import load_policy
from rlhfkit.models.tiny import make_tiny_causal_lm

REWARD = '''
def letters(prompts, completions):
    return [sum(c.isascii() and c.isalpha() for c in text) - 0.01 * len(text) for text in completions]
'''


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_causal_lm(tmp_path_factory.mktemp("tiny") / "model", seed=5)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("files")
    (root / "reward.py").write_text(REWARD)
    (root / "prompts.jsonl").write_text(
        json.dumps({"prompt": "hello", "id": 1}) + "\n" +
        json.dumps({"messages": [{"role": "user", "content": "hi there"}], "id": 2}) + "\n")
    return root


def test_argmax_takes_the_first_of_ties():
    assert argmax([0.1, 0.5, 0.5, -1.0]) == 1
    assert argmax([-3.0]) == 0


def test_best_of_n_returns_the_argmax_of_the_scores(tiny):
    model, tokenizer = load_policy(tiny)
    calls = []

    def reward(prompts, completions):
        calls.append(len(completions))
        return [float(len(c)) + 0.001 * i for i, c in enumerate(completions)]

    prompts = ["one", "two", "three"]
    results = best_of_n(model, tokenizer, prompts, reward, n=5,
                        params=SamplingParams(strategy="sample", max_new_tokens=10, seed=0))
    assert calls == [15]  # one scoring call for every completion of every prompt
    assert len(results) == 3
    for r in results:
        assert isinstance(r, BestOfN) and len(r.completions) == len(r.scores) == 5
        assert r.best == r.completions[max(range(5), key=lambda i: r.scores[i])]
        assert r.scores[r.best_index] == max(r.scores)
        completions, scores, best = r  # unpacks as a plain triple
        assert best == r.best


def test_best_of_n_accepts_a_reward_spec(tiny, files):
    model, tokenizer = load_policy(tiny)
    results = best_of_n(model, tokenizer, ["hello"], f"{files / 'reward.py'}:letters", n=4,
                        params=SamplingParams(max_new_tokens=8, seed=1))
    assert results[0].scores[results[0].best_index] == max(results[0].scores)


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_generate_cli_keeps_the_record_and_adds_completions(tiny, files, tmp_path):
    out = tmp_path / "out.jsonl"
    code = cli(["generate", "--model", tiny, "--prompts", str(files / "prompts.jsonl"), "--output", str(out),
                "--strategy", "sample", "--samples-per-prompt", "3", "--max-new-tokens", "6", "--top-k", "20",
                "--top-p", "0.9", "--min-p", "0.01", "--temperature", "0.8", "--repetition-penalty", "1.2",
                "--generation-batch-size", "1"])
    assert code == 0
    rows = read(out)
    assert [r["id"] for r in rows] == [1, 2]
    assert rows[0]["prompt"] == "hello" and rows[1]["messages"][0]["content"] == "hi there"
    assert all(len(r["completions"]) == 3 and all(isinstance(c, str) for c in r["completions"]) for r in rows)


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_generate_cli_deterministic_strategies(tiny, files, tmp_path, strategy):
    outs = []
    for i in range(2):
        out = tmp_path / f"{i}.jsonl"
        assert cli(["generate", "--model", tiny, "--prompts", str(files / "prompts.jsonl"), "--output", str(out),
                    "--strategy", strategy, "--num-beams", "2", "--max-new-tokens", "6"]) == 0
        outs.append(read(out))
    assert outs[0] == outs[1]


def test_generate_cli_best_of(tiny, files, tmp_path, capsys):
    out = tmp_path / "best.jsonl"
    code = cli(["generate", "--model", tiny, "--prompts", str(files / "prompts.jsonl"), "--output", str(out),
                "--best-of", "4", "--reward", f"{files / 'reward.py'}:letters", "--max-new-tokens", "8"])
    assert code == 0
    for row in read(out):
        assert len(row["completions"]) == len(row["scores"]) == 4
        assert row["best"] == row["completions"][argmax(row["scores"])]
    assert "mean best" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--best-of", "4"], "--best-of needs --reward"),
    (["--best-of", "4", "--reward", "nope.py:f"], "no such file"),
    (["--strategy", "beam", "--num-beams", "2", "--samples-per-prompt", "3"],
     "--num-beams must be >= --samples-per-prompt for beam search"),
    (["--best-of", "4", "--reward", "r.py:f", "--samples-per-prompt", "2"],
     "--best-of 4 sets the completions per prompt; --samples-per-prompt 2 contradicts it"),
    (["--temperature", "0"], "--temperature must be > 0"),
])
def test_generate_cli_rejects_bad_flags(tiny, files, tmp_path, capsys, argv, message):
    code = cli(["generate", "--model", tiny, "--prompts", str(files / "prompts.jsonl"),
                "--output", str(tmp_path / "o.jsonl"), *argv])
    assert code == 2
    assert message in capsys.readouterr().err


SECOND = '''
def short(prompts, completions):
    return [-len(text) / 4 for text in completions]
'''


@pytest.mark.parametrize("extra, combine", [
    (["--reward-weight", "1", "--reward-weight", "2"], lambda letters, short: letters + 2 * short),
    (["--reward-gate", "short:-1"], lambda letters, short: short if short < -1 else letters + short),
])
def test_generate_best_of_picks_by_the_combined_score(tiny, files, tmp_path, extra, combine):
    """Two rewards: `scores` is their combination (worked here from each reward on the same
    completions) and `best` its argmax."""
    from rlhfkit.rl.rewards import load_reward

    (tmp_path / "second.py").write_text(SECOND)
    out = tmp_path / "best.jsonl"
    code = cli(["generate", "--model", tiny, "--prompts", str(files / "prompts.jsonl"), "--output", str(out),
                "--best-of", "6", "--reward", f"{files / 'reward.py'}:letters",
                "--reward", f"{tmp_path}/second.py:short",
                *extra, "--max-new-tokens", "8"])
    assert code == 0
    letters, short = load_reward(f"{files / 'reward.py'}:letters"), load_reward(f"{tmp_path}/second.py:short")
    for row in read(out):
        texts = row["completions"]
        by_hand = [combine(a, b) for a, b in zip(letters(["p"] * 6, texts), short(["p"] * 6, texts))]
        assert row["scores"] == pytest.approx(by_hand)
        assert row["best"] == texts[argmax(by_hand)]
    assert len({len(t) for row in read(out) for t in row["completions"]}) > 1  # the short reward had a say


@pytest.mark.parametrize("argv, message", [
    (["--reward-weight", "1", "--reward-weight", "2"], "--reward-weight: 2 weight(s) for 1 reward(s)"),
    (["--reward-gate", "safety:0"], "--reward-gate 'safety:0': no reward named 'safety'"),
    (["--reward-weight", "1"], "--reward-weight needs --reward"),
])
def test_generate_rejects_bad_reward_combinations_before_loading(tiny, files, tmp_path, capsys, no_model_loading,
                                                                 argv, message):
    reward = ["--reward", f"{files / 'reward.py'}:letters"] if "needs" not in message else []
    code = cli(["generate", "--model", tiny, "--prompts", str(files / "prompts.jsonl"),
                "--output", str(tmp_path / "o.jsonl"), "--best-of", "2", *reward, *argv])
    assert code == 2
    assert message in capsys.readouterr().err
    assert no_model_loading == []


# ------------------------------------------------------------------ process reward models


def test_a_prm_reward_prefers_the_chain_without_a_bad_step(tiny_prm):
    from rlhfkit.rl.rewards import load_reward

    chains = ["good step 0\ngood step 1\ngood step 2", "good step 0\nbad step 1\ngood step 2"]
    for aggregate in ("min", "prod", "last"):
        reward = load_reward(f"prm:{tiny_prm}", prm_aggregate=aggregate)
        good, bad = reward(["task 5", "task 5"], chains)
        assert 0 <= bad < 0.5 <= good <= 1, aggregate


def test_generate_best_of_with_a_prm_picks_the_chain_it_scores_highest(tiny, tiny_prm, files, tmp_path):
    import rlhfkit

    prompts = files / "prompts.jsonl"
    prm = rlhfkit.load_prm(tiny_prm)
    for aggregate in ("min", "last"):
        out = tmp_path / f"{aggregate}.jsonl"
        assert cli(["generate", "--model", tiny, "--prompts", str(prompts), "--output", str(out), "--best-of", "4",
                    "--reward", f"prm:{tiny_prm}", "--prm-aggregate", aggregate, "--max-new-tokens", "12"]) == 0
        for row in read(out):
            prompt = row.get("prompt") or row["messages"]
            expected = prm.score([prompt] * 4, row["completions"], aggregate)
            assert row["scores"] == pytest.approx(expected, abs=1e-5)
            assert row["best"] == row["completions"][argmax(expected)]


@pytest.mark.parametrize("spec, message", [
    ("prm:/no/such/folder", "no such folder"),
    ("prm:{tiny}", "is not a process reward model"),
])
def test_a_bad_prm_reward_exits_2(tiny, files, tmp_path, capsys, spec, message):
    code = cli(["generate", "--model", tiny, "--prompts", str(files / "prompts.jsonl"), "--output",
                str(tmp_path / "o.jsonl"), "--best-of", "2", "--reward", spec.format(tiny=tiny)])
    assert code == 2
    assert message in capsys.readouterr().err
