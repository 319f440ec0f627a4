"""`rlhfkit demo --quick` end to end on the embedded SmolLM2 (offline): the report and plots exist.

This is the smoke test of `make demo`; the full run's figures (win rate, KL) are recorded in
the issue notes, never asserted here: a 3-iteration run proves the plumbing, not RLHF.
"""

import json

import pytest

from rlhfkit.cli import main


@pytest.mark.slow
@pytest.mark.timeout(1800)  # a few minutes on an idle machine; generous for a loaded one
def test_quick_demo_writes_the_report(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--output", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "win rate:" in report
    assert "reward model held-out accuracy" in report
    assert "reward model agreement with the oracle" in report
    for png in ("reward_curve.png", "kl_curve.png", "reward_vs_kl.png"):
        assert (out / png).stat().st_size > 1000
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) >= {"initial", "ppo", "dpo", "best-of-2"}
    assert 0.0 <= results["methods"]["ppo"]["win_rate"] <= 1.0
    assert [p["step"] for p in results["frontier"]] == [0, 1, 2, 3]
    # the curve's ends are the measured initial and final rows, not a second sample
    assert results["frontier"][0]["kl"] == 0.0
    assert results["frontier"][-1]["kl"] == results["methods"]["ppo"]["kl"]
    assert 0.0 <= results["reward_model"]["oracle_agreement"] <= 1.0
    # model output is untrusted: the HTML report escapes it
    assert "<script" not in (out / "report.html").read_text().split("<h2>Before and after</h2>")[1]
    # K = 4 replies per preference prompt, every pair judged; held-out pairs share no prompt (no reply) with training
    rows = {name: [json.loads(line) for line in (out / "data" / f"pairs_{name}.jsonl").read_text().splitlines()]
            for name in ("train", "heldout")}
    prompts = {name: [r["prompt"] for r in rs] for name, rs in rows.items()}
    assert not set(prompts["train"]) & set(prompts["heldout"])
    assert max(prompts["train"].count(p) for p in prompts["train"]) > 1
    assert all(prompts["train"].count(p) <= 6 for p in prompts["train"])


def test_pairs_are_split_by_prompt():
    from rlhfkit.demo import split_pairs_by_prompt

    pairs = [{"prompt": p, "i": i} for i, p in enumerate("aaabbbcccddd")]
    train, held = split_pairs_by_prompt(pairs, 1 / 4)
    assert [r["i"] for r in held] == [0, 1, 2] and [r["i"] for r in train] == list(range(3, 12))
    train, held = split_pairs_by_prompt(pairs[:3], 1 / 8)  # one prompt: it is held out, nothing left to train
    assert len(held) == 3 and train == []
