"""`rlhfkit demo --quick` end to end on the embedded SmolLM2 (offline): the report and plots exist.

This is the smoke test of `make demo`; the full run's figures (win rate, KL) are recorded in
the issue notes, never asserted here: a 3-iteration run proves the plumbing, not RLHF.
"""

import json

import pytest

from rlhfkit.cli import main
from rlhfkit.errors import InputError


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
    # K = 4 replies per preference prompt, every pair judged; the held-out pairs are the initial policy's
    # N + 1 = 3 replies to the held-out prompts, which share no prompt (no reply) with training
    rows = {name: [json.loads(line) for line in (out / "data" / f"pairs_{name}.jsonl").read_text().splitlines()]
            for name in ("train", "heldout")}
    prompts = {name: [r["prompt"] for r in rs] for name, rs in rows.items()}
    assert not set(prompts["train"]) & set(prompts["heldout"])
    assert max(prompts["train"].count(p) for p in prompts["train"]) > 1
    assert all(prompts["train"].count(p) <= 6 for p in prompts["train"])
    assert all(prompts["heldout"].count(p) <= 3 for p in prompts["heldout"])
    assert set(prompts["heldout"]) <= {json.loads(line)["prompt"] for line in
                                       (out / "data" / "prompts_heldout.jsonl").read_text().splitlines()}
    assert results["prompts"]["baseline_samples"] == 3



def test_win_rate_averages_each_reply_against_every_baseline_reply():
    from rlhfkit.demo import oracle_win_rate

    # prompt 1: 0.5 beats 0.1, ties 0.5, loses to 0.9 -> (1 + 0.5 + 0) / 3; prompt 2: beats both -> 1
    wins = oracle_win_rate([0.5, 0.2], [[0.1, 0.5, 0.9], [0.0, -0.3]])
    assert wins.win_rate == pytest.approx((1.5 / 3 + 1.0) / 2)
    assert wins.n == 2  # prompts are the units of the standard error
    assert wins.stderr == pytest.approx(0.25 / 2 ** 0.5)  # population std of (0.5, 1.0) over sqrt(2)


def test_best_of_n_leave_one_out_picks_among_the_other_replies():
    from rlhfkit.demo import leave_one_out_best_of_n

    # one prompt, 3 replies: reward model scores and oracle scores
    rm = [[0.9, 0.1, 0.5]]
    oracle = [[0.0, 0.8, 0.3]]
    # j=0: pick among {1, 2} by rm -> 2 (oracle 0.3) vs reply 0 (0.0): win
    # j=1: pick among {0, 2} -> 0 (oracle 0.0) vs 0.8: loss
    # j=2: pick among {0, 1} -> 0 (oracle 0.0) vs 0.3: loss
    out = leave_one_out_best_of_n(rm, oracle)
    assert out["win_rate"].win_rate == pytest.approx(1 / 3)
    assert out["oracle_mean"] == pytest.approx((0.3 + 0.0 + 0.0) / 3)
    assert out["rm_mean"] == pytest.approx((0.5 + 0.9 + 0.9) / 3)
    assert out["picks"] == [2]
    # a tie in the oracle counts half; a second prompt averages per prompt
    out = leave_one_out_best_of_n([[1.0, 0.0], [0.0, 1.0]], [[0.2, 0.2], [0.1, 0.4]])
    # prompt 1: both comparisons tie (0.5); prompt 2: j=0 pick 1 (0.4 > 0.1) win, j=1 pick 0 (0.1 < 0.4) loss
    assert out["win_rate"].win_rate == pytest.approx((0.5 + 0.5) / 2)


def test_a_bad_sample_dtype_is_refused_before_any_model_is_loaded(no_model_loading, tmp_path):
    from rlhfkit import demo

    with pytest.raises(InputError) as e:
        demo.main(demo.Config(sample_dtype="float16", output=str(tmp_path / "out")))
    assert e.value.problems == ["--sample-dtype: 'float16' is not one of auto, float32, bfloat16"]
    assert no_model_loading == [] and not (tmp_path / "out").exists()
