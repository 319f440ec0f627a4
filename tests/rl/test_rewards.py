"""Several rewards as one (rl/rewards.py): names, the weighted and safety-gated combination worked by
hand, and the problems found before anything loads."""

from __future__ import annotations

import pytest

from rlhfkit.errors import InputError
from rlhfkit.rl.rewards import (
    CombinedReward,
    build_reward,
    check_reward_combination,
    combine_scores,
    parse_gate,
    reward_name,
    score_parts,
    split_named,
)

REWARDS = '''
def helpful(prompts, completions):
    return [len(c) / 10 for c in completions]

def safe(prompts, completions):
    return [-1.0 if "bad" in c else 0.5 for c in completions]
'''


@pytest.fixture
def reward_file(tmp_path) -> str:
    path = tmp_path / "rewards.py"
    path.write_text(REWARDS)
    return str(path)


def test_names_default_to_the_function_folder_or_host_and_name_eq_spec_overrides(tmp_path):
    folder = tmp_path / "rm-helpful"
    folder.mkdir()
    assert reward_name("path/to/r.py:helpful") == "helpful"
    assert reward_name("pkg.mod:safety_score") == "safety_score"
    assert reward_name(str(folder)) == "rm-helpful"
    assert reward_name(str(folder) + "/") == "rm-helpful"
    assert reward_name("http://localhost:8000/score") == "localhost"
    assert split_named("safety=http://h:1/s?a=b") == ("safety", "http://h:1/s?a=b")
    assert split_named("http://h:1/s?a=b") == ("h", "http://h:1/s?a=b")  # '=' in a URL is not a name
    assert split_named("r.py:f") == ("f", "r.py:f")


def test_weighted_sum_worked_by_hand():
    # two rewards over three samples, weights 1 and 0.5:
    #   sample 0: 1·2 + 0.5·(−1) = 1.5;  sample 1: 1·0 + 0.5·4 = 2;  sample 2: 1·(−3) + 0.5·0 = −3
    scores = [[2.0, 0.0, -3.0], [-1.0, 4.0, 0.0]]
    assert combine_scores(scores, [1.0, 0.5]) == [1.5, 2.0, -3.0]


def test_gate_below_the_threshold_takes_the_gated_score_and_the_weighted_sum_elsewhere():
    # helpful = [2, 3, 1], safety = [−0.5, 0.2, 0.15], weights 1, 1, gate safety:0.15
    #   sample 0: safety −0.5 < 0.15 -> −0.5 (the gated score alone)
    #   sample 1: safety 0.2 >= 0.15 -> 3 + 0.2 = 3.2
    #   sample 2: safety 0.15 is not below 0.15 -> 1 + 0.15 = 1.15
    scores = [[2.0, 3.0, 1.0], [-0.5, 0.2, 0.15]]
    assert combine_scores(scores, [1.0, 1.0], gate=1, threshold=0.15) == pytest.approx([-0.5, 3.2, 1.15])


def test_build_reward_combines_loaded_rewards_and_reports_each(reward_file):
    completions = ["good answer", "bad", "ok"]
    reward = build_reward([f"{reward_file}:helpful", f"{reward_file}:safe"], [2.0, 1.0], "safe:0")
    assert isinstance(reward, CombinedReward)
    # helpful = [1.1, 0.3, 0.2], safe = [0.5, −1, 0.5]; gate safe < 0 on sample 1 only
    assert reward(["p"] * 3, completions) == pytest.approx([2 * 1.1 + 0.5, -1.0, 2 * 0.2 + 0.5])
    combined, parts = score_parts(reward, ["p"] * 3, completions)
    assert combined == pytest.approx([2.7, -1.0, 0.9])
    assert list(parts) == ["helpful", "safe"]
    assert parts["helpful"] == pytest.approx([1.1, 0.3, 0.2]) and parts["safe"] == [0.5, -1.0, 0.5]


def test_one_reward_stays_the_plain_source(reward_file):
    reward = build_reward([f"{reward_file}:helpful"])
    assert not isinstance(reward, CombinedReward)
    assert score_parts(reward, ["p"], ["abcde"]) == ([0.5], {})
    weighted = build_reward([f"h={reward_file}:helpful"], [3.0])  # a weight makes it a combination
    assert score_parts(weighted, ["p"], ["abcde"]) == ([1.5], {"h": [0.5]})


@pytest.mark.parametrize("specs,weights,gate,message", [
    (["a.py:f", "b.py:g"], [1.0], "", "--reward-weight: 1 weight(s) for 2 reward(s)"),
    (["a.py:f", "b.py:g"], [], "h:0.5", "--reward-gate 'h:0.5': no reward named 'h'"),
    (["a.py:f", "b.py:g"], [], "f", "expected NAME:THRESHOLD"),
    (["a.py:f", "b.py:g"], [], "f:high", "the threshold 'high' is not a number"),
    (["a.py:f", "b.py:f"], [], "", "two rewards are named 'f'"),
    ([], [1.0], "", "--reward is required"),
])
def test_bad_combinations_are_named(tmp_path, specs, weights, gate, message):
    for name in ("a.py", "b.py"):
        (tmp_path / name).write_text(REWARDS)
    specs = [str(tmp_path / s) for s in specs]
    problems = check_reward_combination(specs, weights, gate)
    assert any(message in p for p in problems), problems
    with pytest.raises(InputError):
        build_reward(specs, weights, gate)


def test_parse_gate():
    assert parse_gate("safety:0.15") == ("safety", 0.15)
    assert parse_gate("a:b:-1") == ("a:b", -1.0)
    with pytest.raises(ValueError):
        parse_gate(":1")
