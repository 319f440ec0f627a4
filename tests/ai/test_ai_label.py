"""`rlhfkit ai-label` end to end against a scripted judge with a hidden preference and a position bias.

The scripted judge prefers the reply containing the word "kind" wherever it is shown, calls two
replies without (or both with) it a tie, and on prompts marked BIASED says [[A]] whatever it is
shown: those pairs are position-inconsistent and must be held back.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest

from core_helpers import write_jsonl
from rlhfkit.data.constitution import load_constitution
from rlhfkit.data.io import Record
from rlhfkit.data.schema import load_preferences
from rlhfkit.label.ai_label import FORMAT_REMINDER, parse_comparisons
from scripted_endpoint import ScriptedEndpoint, pairwise_shown

PRINCIPLES = [
    {"name": "kindness", "critique": "Point out anything unkind.", "revision": "Rewrite it kindly.",
     "preference": "Which reply is kinder and more considerate towards the user?"},
    {"name": "honesty", "critique": "Point out anything untrue.", "revision": "Rewrite it truthfully.",
     "preference": "Choose the reply that is more honest, and says so when it does not know."},
    {"name": "harmlessness", "critique": "Point out anything harmful.", "revision": "Remove the harm.",
     "preference": "Which of these replies is less harmful? Choose the one a wise, ethical person would give."},
    {"name": "helpfulness", "critique": "Point out what is unhelpful.", "revision": "Make it helpful.",
     "preference": "Which reply helps the user more, without being preachy or evasive?"},
]

# 6 pairs with one kind reply (on either side), 2 BIASED pairs, 1 tie.
COMPARISONS = (
    [{"prompt": f"question {i}", "response_a": f"a kind answer {i}", "response_b": f"a curt answer {i}"}
     if i % 2 == 0 else
     {"prompt": f"question {i}", "response_a": f"a curt answer {i}", "response_b": f"a kind answer {i}"}
     for i in range(6)]
    + [{"prompt": "BIASED question 6", "response_a": "a curt answer 6", "response_b": "a kind answer 6"},
       {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "BIASED question 7"}],
        "response_a": "a kind answer 7", "response_b": "a curt answer 7"},
       {"prompt": "question 8", "response_a": "plain answer 8", "response_b": "another plain answer 8"}]
)

def hidden_judge(body) -> str:
    a, b, _ = pairwise_shown(body)
    user = body["messages"][1]["content"]
    if "MUMBLE" in user and (body["messages"][-1]["content"] != FORMAT_REMINDER or "ALWAYS" in user):
        return "Hmm, hard to say."
    if "BIASED" in user:
        return "The first one reads better. [[A]]"
    if ("kind" in a) == ("kind" in b):
        return "They are equally good. [[C]]"
    return "A is kinder. [[A]]" if "kind" in a else "B is kinder. [[B]]"


@pytest.fixture
def files(tmp_path):
    return {"data": write_jsonl(tmp_path / "pairs.jsonl", COMPARISONS),
            "constitution": write_jsonl(tmp_path / "constitution.jsonl", PRINCIPLES)}


def ai_label(run_cli, ep, data, constitution, out, *extra):
    return run_cli("ai-label", "--data", data, "--constitution", constitution, "--output", out,
                   "--judge-url", ep.url, "--judge-model", "scripted-judge", *extra)


def read_rows(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "preferences.jsonl").read_text().splitlines()]


def stats_of(out) -> dict:
    return json.loads((Path(out) / "stats.json").read_text())


def test_labels_follow_the_hidden_preference_in_both_orders_and_hold_back_position_bias(run_cli, files, tmp_path):
    out = tmp_path / "out"
    with ScriptedEndpoint(hidden_judge) as ep:
        result = ai_label(run_cli, ep, files["data"], files["constitution"], out, "--concurrency", "3")
        assert result.code == 0, result.err
        bodies = list(ep.seen)
    assert len(bodies) == 2 * len(COMPARISONS)  # both orders, once each
    by_pair = {}
    for body in bodies:
        a, b, principle = pairwise_shown(body)
        by_pair.setdefault(frozenset((a, b)), []).append((a, b, principle))
    assert len(by_pair) == len(COMPARISONS)
    for asked in by_pair.values():
        (a1, b1, p1), (a2, b2, p2) = asked
        assert (a1, b1) == (b2, a2) and p1 == p2  # both presentation orders, the same principle

    rows = read_rows(out)
    assert len(rows) == 6 and all("kind" in r["chosen"] and "kind" not in r["rejected"] for r in rows)
    assert all(r["verdicts"] == {"chosen_first": "A", "rejected_first": "B"} and r["consistent"] for r in rows)
    assert all(r["tie"] is False and r["p_chosen"] is None for r in rows)
    assert all(r["judge"] == f"{ep.url}/chat/completions (scripted-judge)" for r in rows)
    assert {r["prompt"] for r in rows} == {f"question {i}" for i in range(6)}

    # Principles: sampled per comparison; their texts reach the judge verbatim; rows name them.
    texts = {p["preference"]: p["name"] for p in PRINCIPLES}
    sent = Counter(principle for _, _, principle in (x for asked in by_pair.values() for x in asked))
    assert set(sent) <= set(texts) and len(sent) >= 2
    for r in rows:
        (_, _, principle), _ = by_pair[frozenset((r["chosen"], r["rejected"]))]
        assert r["principle"] == texts[principle]
    stats = stats_of(out)
    assert sum(stats["principles"].values()) == len(COMPARISONS)
    assert stats["principles"] == {texts[p]: n // 2 for p, n in sent.items()}  # each sent in both orders

    assert {k: stats[k] for k in ("pairs", "labelled", "consistent", "position_inconsistent", "ties", "unparsed",
                                  "written", "pending")} == {
        "pairs": 9, "labelled": 6, "consistent": 7, "position_inconsistent": 2, "ties": 1, "unparsed": 0,
        "written": 6, "pending": 0}
    # Verdicts shown first vs second: 6 A + 6 B from the fair pairs, 4 A from the biased, 2 C from the tie.
    assert stats["position_bias"] == {"first": 10, "second": 6, "tie": 2, "first_share": 10 / 16}
    assert stats["agreement"] is None
    assert result.out.strip().splitlines()[-1].startswith(
        "ai-label: 9 pairs, 6 labelled; held back: 2 position-inconsistent, 1 ties, 0 unparsed; "
        "first-position share 0.62")
    assert (out / "config.yaml").exists()


def test_keep_ties_writes_ties_and_inconsistent_pairs_marked_and_trainers_skip_them(run_cli, files, tmp_path, tiny_lm):
    out = tmp_path / "out"
    with ScriptedEndpoint(hidden_judge) as ep:
        assert ai_label(run_cli, ep, files["data"], files["constitution"], out, "--keep-ties").code == 0
    rows = read_rows(out)
    ties = [r for r in rows if r["tie"]]
    assert len(rows) == 9 and len(ties) == 3
    assert sorted((r["consistent"], r["verdicts"]["chosen_first"], r["verdicts"]["rejected_first"]) for r in ties) == [
        (False, "A", "A"), (False, "A", "A"), (True, "C", "C")]
    assert {json.dumps(r["prompt"]) for r in ties} == {json.dumps(c["prompt"]) for c in COMPARISONS[6:]}
    assert all(r["chosen"] == c["response_a"] for r, c in zip(ties, COMPARISONS[6:]))  # the stored order
    assert len(load_preferences(str(out / "preferences.jsonl"))) == 6

    # `rlhfkit rm` trains on the output as it is (ties in it included).
    result = run_cli("rm", "--model", tiny_lm, "--data", out / "preferences.jsonl", "--output", tmp_path / "rm",
                     "--max-steps", "1", "--batch-size", "4", "--no-progress")
    assert result.code == 0, result.err
    assert (tmp_path / "rm" / "metrics.jsonl").exists()


def test_an_unparseable_verdict_is_asked_again_once_then_counted(run_cli, tmp_path, files):
    data = write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "MUMBLE first", "response_a": "a curt answer", "response_b": "a kind answer"},
        {"prompt": "MUMBLE ALWAYS", "response_a": "a kind answer", "response_b": "a curt answer"}])
    out = tmp_path / "out"
    with ScriptedEndpoint(hidden_judge) as ep:
        assert ai_label(run_cli, ep, data, files["constitution"], out).code == 0
        retries = [b for b in ep.seen if b["messages"][-1]["content"] == FORMAT_REMINDER]
    assert len(ep.seen) == 4 + 4 and len(retries) == 4  # each verdict retried once, with the reply it failed
    assert all(b["messages"][2] == {"role": "assistant", "content": "Hmm, hard to say."} for b in retries)
    stats = stats_of(out)
    assert (stats["labelled"], stats["unparsed"], stats["retried_verdicts"]) == (1, 1, 4)
    assert [r["chosen"] for r in read_rows(out)] == ["a kind answer"]


def test_soft_labels_from_the_judges_token_log_probs(run_cli, files, tmp_path):
    # Verdict A comes as "[[", "A", "]]" with P(A, B, C) = .6, .3, .1; verdict B as "[[B", "]]" with
    # P([[B) = .5, P([[A) = .25, P([[C) = .125, P([[) = .125 (not a choice). For a pair whose kind reply
    # is `a`: a shown first -> [[A]], p_first = .6 + .1/2 = .65; a shown second -> [[B]], the first
    # reply's p_first = (.25 + .125/2) / .875 = .357142...; P(a) = (.65 + 1 - .357142...) / 2.
    def token_logprobs(body, text):
        assert body["top_logprobs"] == 5

        def token(t, p, top):
            return {"token": t, "logprob": math.log(p),
                    "top_logprobs": [{"token": k, "logprob": math.log(v)} for k, v in top.items()]}
        head = text[:text.index("[[")]
        if text.endswith("[[A]]"):
            return [token(head, 1.0, {}), token("[[", 0.9, {}), token("A", 0.6, {"A": 0.6, "B": 0.3, "C": 0.1}),
                    token("]]", 1.0, {})]
        return [token(head, 1.0, {}), token("[[B", 0.5, {"[[B": 0.5, "[[A": 0.25, "[[C": 0.125, "[[": 0.125}),
                token("]]", 1.0, {})]

    out = tmp_path / "out"
    data = write_jsonl(tmp_path / "d.jsonl", COMPARISONS[:2])
    with ScriptedEndpoint(hidden_judge, token_logprobs) as ep:
        assert ai_label(run_cli, ep, data, files["constitution"], out).code == 0
    expected = (0.65 + 1 - (0.25 + 0.0625) / 0.875) / 2
    rows = read_rows(out)
    assert [r["chosen"] for r in rows] == ["a kind answer 0", "a kind answer 1"]  # kind reply as a, then as b
    assert [r["p_chosen"] for r in rows] == pytest.approx([expected, expected], abs=1e-6)
    assert stats_of(out)["soft_labels"] == 2


def test_relabelling_reports_agreement_with_the_existing_labels(run_cli, files, tmp_path):
    data = write_jsonl(tmp_path / "prefs.jsonl", [
        {"prompt": f"q{i}", "chosen": f"a kind answer {i}", "rejected": f"a curt answer {i}"} for i in range(3)] + [
        {"prompt": "q3", "chosen": "a curt answer 3", "rejected": "a kind answer 3"},
        {"prompt": "BIASED q4", "chosen": "a kind answer 4", "rejected": "a curt answer 4"}])
    out = tmp_path / "out"
    with ScriptedEndpoint(hidden_judge) as ep:
        result = ai_label(run_cli, ep, data, "builtin", out)
        sent = {pairwise_shown(body)[2] for body in ep.seen}
    assert result.code == 0, result.err
    builtin = {p.name: p.preference for p in load_constitution("builtin")}
    assert sent <= set(builtin.values())
    assert {r["principle"] for r in read_rows(out)} <= set(builtin)
    assert stats_of(out)["agreement"] == {"labelled_pairs": 5, "compared": 4, "agree": 3, "rate": 0.75,
                                          "mean_p_input_chosen": None}
    assert [r["label_agrees"] for r in read_rows(out)] == [True, True, True, False]
    assert "agreement with the input labels 0.75 (3/4)" in result.out


def test_resume_after_an_endpoint_failure_sends_no_request_twice(run_cli, files, tmp_path, monkeypatch):
    monkeypatch.setattr("rlhfkit.models.backends.time.sleep", lambda s: None)  # the backoff between retries
    state = {"answered": 0, "fail": True}
    answered = Counter()

    def failing_judge(body):
        if state["fail"] and state["answered"] == 7:  # the 8th request: comparison 3 shown the second way
            return 500, {"error": {"message": "the judge fell over"}}
        state["answered"] += 1
        answered[json.dumps(body["messages"])] += 1
        return hidden_judge(body)

    out = tmp_path / "out"
    with ScriptedEndpoint(failing_judge) as ep:
        first = ai_label(run_cli, ep, files["data"], files["constitution"], out, "--concurrency", "1")
        assert first.code == 1
        assert len(first.err.strip().splitlines()) == 1
        assert first.err.startswith(f"error: judge endpoint {ep.url}/chat/completions (model 'scripted-judge'): "
                                    "HTTP 500: the judge fell over")
        assert "3 pairs labelled before it" in first.err
        assert [r["prompt"] for r in read_rows(out)] == ["question 0", "question 1", "question 2"]
        assert stats_of(out)["pending"] == 6

        state["fail"] = False
        second = ai_label(run_cli, ep, files["data"], files["constitution"], out, "--concurrency", "1")
        assert second.code == 0, second.err
        assert sum(answered.values()) == 2 * len(COMPARISONS) and set(answered.values()) == {1}
        assert len(read_rows(out)) == 6 and stats_of(out)["pending"] == 0

        requests_so_far = len(ep.seen)
        assert ai_label(run_cli, ep, files["data"], files["constitution"], out).code == 0
        assert len(ep.seen) == requests_so_far  # a finished run reruns from its journal alone


def test_an_unauthorised_judge_ends_with_one_line_keeping_what_was_labelled(run_cli, files, tmp_path, monkeypatch):
    monkeypatch.setenv("RLHFKIT_TEST_JUDGE_KEY", "sk-do-not-write-me")
    state = {"n": 0}

    def revoked_after_two_pairs(body):
        state["n"] += 1
        return (401, {"error": {"message": "invalid api key"}}) if state["n"] > 4 else hidden_judge(body)

    out = tmp_path / "out"
    with ScriptedEndpoint(revoked_after_two_pairs) as ep:
        result = ai_label(run_cli, ep, files["data"], files["constitution"], out, "--concurrency", "1",
                          "--judge-api-key-env", "RLHFKIT_TEST_JUDGE_KEY")
        assert ep.headers[0]["Authorization"] == "Bearer sk-do-not-write-me"
    assert result.code == 1
    assert result.err.count("\n") == 1 and "HTTP 401: invalid api key" in result.err
    assert "RLHFKIT_TEST_JUDGE_KEY" in result.err
    assert [r["prompt"] for r in read_rows(out)] == ["question 0", "question 1"]
    for path in out.iterdir():
        assert "sk-do-not-write-me" not in path.read_text()


def test_bad_input_names_file_line_and_field_and_sends_nothing(run_cli, files, tmp_path):
    data = write_jsonl(tmp_path / "bad.jsonl", [
        {"prompt": "fine", "response_a": "x", "response_b": "y"},
        {"prompt": "no b", "response_a": "x"},
        {"prompt": "one completion", "completions": ["only"]},
        {"response_a": "x", "response_b": "y"},
        {"prompt": "what", "answer": "x"}])
    with ScriptedEndpoint(hidden_judge) as ep:
        result = ai_label(run_cli, ep, data, files["constitution"], tmp_path / "out")
        assert ep.seen == []
    assert result.code == 2
    assert result.errors == [
        f"error: {data}:2: field 'response_b': missing field",
        f"error: {data}:3: field 'completions': expected a list of at least 2 replies",
        f"error: {data}:4: field 'prompt': missing field",
        f"error: {data}:5: missing field: expected response_a and response_b, completions, or chosen and rejected"]


def test_a_bad_constitution_exits_2_before_any_request(run_cli, files, tmp_path):
    bad = write_jsonl(tmp_path / "c.jsonl", [{**PRINCIPLES[0], "preference": ""}])
    with ScriptedEndpoint(hidden_judge) as ep:
        result = ai_label(run_cli, ep, files["data"], bad, tmp_path / "out")
        assert ep.seen == []
    assert result.code == 2 and result.errors == [
        f"error: {bad}:1: field 'preference': expected a non-empty string (got '')"]


def test_completions_give_every_pair_or_a_seeded_sample():
    rec = Record({"prompt": "p", "completions": ["one", "two", "one", "three"]}, "f.jsonl", 3)
    problems: list = []
    every = parse_comparisons(rec, problems, 0, seed=0)
    assert [(c.a, c.b) for c in every] == [("one", "two"), ("one", "three"), ("two", "one"), ("two", "three"),
                                           ("one", "three")]  # the identical pair (0, 2) is not compared
    sampled = [[(c.a, c.b) for c in parse_comparisons(rec, problems, 2, seed=s)] for s in (0, 0, 1)]
    assert sampled[0] == sampled[1] and len(sampled[0]) == 2 and set(sampled[0]) <= {(c.a, c.b) for c in every}
    assert problems == []


def test_a_local_tiny_judge_runs_and_resumes_without_loading_it_again(run_cli, files, tmp_path, tiny_lm,
                                                                       monkeypatch):
    data = write_jsonl(tmp_path / "d.jsonl", COMPARISONS[:2])
    out = tmp_path / "out"
    args = ("ai-label", "--data", data, "--constitution", files["constitution"], "--output", out,
            "--judge-model", tiny_lm, "--judge-max-new-tokens", "6", "--top-logprobs", "3")
    result = run_cli(*args)
    assert result.code == 0, result.err
    stats = stats_of(out)
    assert stats["pairs"] == 2 and stats["pending"] == 0
    assert stats["labelled"] + stats["position_inconsistent"] + stats["ties"] + stats["unparsed"] == 2
    journal = (out / "requests.jsonl").read_text().splitlines()
    assert len(journal) == 4 + stats["retried_verdicts"]
    assert all(json.loads(line)["logprobs"] for line in journal)  # a local judge always has log-probs

    import rlhfkit.models.backends as backends
    monkeypatch.setattr(backends, "LocalBackend", lambda *a, **k: pytest.fail("the judge was loaded again"))
    again = run_cli(*args)
    assert again.code == 0 and stats_of(out) == stats
