"""`rlhfkit demo --quick` end to end on the embedded SmolLM2 (offline): the report and plots exist.

This is the smoke test of `make demo`; the full run's figures (win rate, KL) are recorded in
the issue notes, never asserted here: a 3-iteration run proves the plumbing, not RLHF.
"""

import hashlib
import json
import threading

import pytest
import yaml

from rlhfkit.cli import main
from rlhfkit.errors import InputError
from scripted_endpoint import ScriptedEndpoint, pairwise_shown


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


CLOSE_CALL = 0.1  # |VADER(A) - VADER(B)| below this: the scripted judge names whatever it was shown first


def contrarian(a: str, b: str) -> bool:
    """A stable quarter of the pairs, whichever way round they are shown: judged against the oracle."""
    return hashlib.sha256("\n".join(sorted((a, b))).encode()).digest()[0] % 4 == 0


def scripted_letter(vader, a: str, b: str) -> str:
    """The scripted judge's verdict with ``a`` shown first: the warmer reply by VADER (the demo's
    oracle), except on contrarian pairs; on close calls, the first reply (a position bias)."""
    s_a, s_b = vader([a, b])
    if abs(s_a - s_b) < CLOSE_CALL:
        return "A"
    return "A" if (s_a > s_b) != contrarian(a, b) else "B"


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_quick_demo_with_ai_feedback_trains_on_the_judges_labels(tmp_path):
    from rlhfkit.data.annotators import VaderSentiment

    vader, lock = VaderSentiment(), threading.Lock()

    def judge(body):
        a, b, _ = pairwise_shown(body)
        with lock:
            letter = scripted_letter(vader, a, b)
        return f"Reply {letter} is the warmer one. [[{letter}]]"

    out = tmp_path / "demo"
    with ScriptedEndpoint(judge) as ep:
        assert main(["demo", "--quick", "--skip-dpo", "--ppo-steps", "1", "--feedback", "ai", "--judge-url", ep.url,
                     "--judge-model", "scripted-judge", "--output", str(out)]) == 0
    candidates = [json.loads(line) for line in (out / "data" / "pairs_candidates.jsonl").read_text().splitlines()]
    assert len(ep.seen) == 2 * len(candidates)  # both orders of every pair, nothing retried

    # What the scripted judge implies, pair by pair
    expected_rows, first, second, close = [], 0, 0, 0
    for c in candidates:
        a, b = c["response_a"], c["response_b"]
        verdicts = scripted_letter(vader, a, b), scripted_letter(vader, b, a)
        first, second = first + verdicts.count("A"), second + verdicts.count("B")
        if verdicts == ("A", "A"):
            close += 1  # position-inconsistent: held back
        else:
            expected_rows.append((a, b) if verdicts == ("A", "B") else (b, a))
    agree = sum(vader([chosen])[0] > vader([rejected])[0] for chosen, rejected in expected_rows)
    assert 0 < agree < len(expected_rows) and close > 0  # the run exercises all three cases
    rate = agree / len(expected_rows)

    results = json.loads((out / "results.json").read_text())
    ai = results["preferences"]["ai_feedback"]
    assert ai["judge"] == f"{ep.url}/chat/completions (scripted-judge)"
    assert (ai["pairs_judged"], ai["labelled"], ai["position_inconsistent"], ai["ties"], ai["unparsed"]) == (
        len(candidates), len(expected_rows), close, 0, 0)
    assert ai["position_bias"] == {"first": first, "second": second, "tie": 0,
                                   "first_share": pytest.approx(first / (first + second))}
    assert ai["oracle_pairs"] == len(expected_rows)
    assert ai["oracle_agreement"] == pytest.approx(rate) and results["preferences"]["oracle_agreement"] == ai[
        "oracle_agreement"]
    assert ai["oracle_agreement_stderr"] == pytest.approx((rate * (1 - rate) / len(expected_rows)) ** 0.5)

    report = (out / "report.md").read_text()
    assert f"judge agreement with the oracle (VADER, the demo's hidden reward): {100 * rate:.1f}% ± " in report
    assert f"held back: 0 ties, {close} position-inconsistent, 0 unparsed" in report
    assert f"(first-position share {first / (first + second):.2f}; 0.50 is none)" in report

    # The reward model trained on the judge's confident labels, and on nothing else
    train = [json.loads(line) for line in (out / "data" / "pairs_train.jsonl").read_text().splitlines()]
    assert [(r["chosen"], r["rejected"]) for r in train] == expected_rows
    assert all(r["judge"] == ai["judge"] and r["consistent"] and not r["tie"] for r in train)
    rm_config = yaml.safe_load((out / "reward_model" / "config.yaml").read_text())
    assert rm_config["data"] == str(out / "data" / "pairs_train.jsonl")
    assert 0.0 <= results["reward_model"]["eval/accuracy"] <= 1.0


@pytest.mark.parametrize("flags, message", [
    (["--feedback", "ai"], "--feedback ai needs a judge: --judge-model NAME|PATH"),
    (["--feedback", "ai", "--judge-url", "http://127.0.0.1:9/v1"], "--feedback ai needs a judge"),
    (["--judge-url", "http://127.0.0.1:9/v1", "--judge-model", "m"], "apply only with --feedback ai"),
    (["--feedback", "ai", "--judge-model", "m", "--judge-max-new-tokens", "0"], "--judge-max-new-tokens must be >= 1"),
    (["--feedback", "ai", "--judge-model", "m", "--constitution", "{missing}"], "--constitution: no such file"),
])
def test_bad_feedback_flags_exit_2_before_any_model_loads(flags, message, run_cli, no_model_loading, tmp_path):
    out = tmp_path / "out"
    result = run_cli("demo", "--quick", "--output", out, *(f.format(missing=tmp_path / "c.yaml") for f in flags))
    assert result.code == 2 and message in result.err, result.err
    assert no_model_loading == [] and not out.exists()


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
