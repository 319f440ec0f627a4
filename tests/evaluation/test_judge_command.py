"""``rlhfkit judge`` end to end: a stub OpenAI-compatible endpoint, fake judges, a tiny local model."""

from __future__ import annotations

import json
import threading

import pytest

from rlhfkit.cli import main as cli_main
from rlhfkit.config import build_config
from rlhfkit.evaluation.judge import Config, run
from rlhfkit.evaluation.judging.prompts import JUDGE_SYSTEM
from rlhfkit.models.backends import BackendError, OpenAIChatBackend, chat_completions_url
from scripted_endpoint import ScriptedEndpoint

# ---------------------------------------------------------------------------- the stub endpoint


def _stub_judgment(user: str) -> str:
    """A deterministic 'judge' that prefers answers containing GOOD."""
    if "[[PASS]]" in user:
        last = user[user.rindex("[Assistant, turn"):user.index("[End of conversation]")]
        return "Meets it. [[PASS]]" if "GOOD" in last else "Misses it. [[FAIL]]"
    if "[[A]]" in user:
        b_start = user.index("Assistant B")
        part_a, part_b = user[:b_start], user[b_start:]
        part_b = part_b[:part_b.rindex("Do not let the order")]
        if "GOOD" in part_a and "GOOD" not in part_b:
            return "A is better. [[A]]"
        if "GOOD" in part_b and "GOOD" not in part_a:
            return "B is better. [[B]]"
        return "Equal. [[C]]"
    material = user[user.rindex("[Assistant"):]
    return "Helpful. Rating: [[9]]" if "GOOD" in material else "Weak. Rating: [[3]]"


def _respond(body: dict):
    if body["model"] == "unknown":
        return 404, {"error": {"message": "model 'unknown' not found", "type": "invalid_request_error"}}
    messages = body["messages"]
    if messages[0]["role"] == "system" and messages[0]["content"] == JUDGE_SYSTEM:
        return _stub_judgment(messages[-1]["content"])
    return f"GOOD reply from {body['model']} to: {messages[-1]['content'][:30]}"  # a candidate's answer


@pytest.fixture
def stub():
    with ScriptedEndpoint(_respond) as endpoint:
        yield endpoint, endpoint.url


def _answers(path, model, marker, n=20, turns=2, qids=None):
    qids = qids or list(range(1, n + 1))
    path.write_text("".join(json.dumps(
        {"question_id": q, "model_id": model,
         "choices": [{"index": 0, "turns": [f"{marker} answer {q}.{t}" for t in range(1, turns + 1)]}]})
        + "\n" for q in qids))
    return str(path)


# ---------------------------------------------------------------------------- endpoint runs


def test_pairwise_through_endpoint_then_arena(tmp_path, stub, monkeypatch, capsys):
    server, url = stub
    monkeypatch.setenv("RLHFKIT_TEST_JUDGE_KEY", "sekrit")
    good = _answers(tmp_path / "good.jsonl", "good", "GOOD")
    bad = _answers(tmp_path / "bad.jsonl", "bad", "BAD")
    out, battles = tmp_path / "out", tmp_path / "battles.jsonl"
    code = cli_main(["judge", "--mode", "pairwise", "--judge-url", url, "--judge-model", "stub",
                     "--judge-api-key-env", "RLHFKIT_TEST_JUDGE_KEY", "--answers", good, bad,
                     "--limit", "3", "--output", str(out), "--emit-battles", str(battles)])
    assert code == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    (pair,) = results["summary"]["pairs"]
    assert (pair["model_a"], pair["model_b"]) == ("good", "bad")
    assert (pair["wins"], pair["losses"], pair["ties"], pair["invalid"]) == (6, 0, 0, 0)
    assert pair["win_rate"] == 1.0 and pair["consistency"] == 1.0
    assert results["judge_health"]["malformed"] == 0
    # 3 questions x 2 turns x 2 orders
    judgments = [json.loads(line) for line in (out / "judgments.jsonl").read_text().splitlines()]
    assert len(judgments) == 12 and {j["game"] for j in judgments} == {1, 2}
    assert all(j["judgment"] and j["verdict"] in ("A", "B") for j in judgments)
    assert {h["Authorization"] for h in server.headers} == {"Bearer sekrit"}
    assert {body["model"] for body in server.seen} == {"stub"}
    report = (out / "report.md").read_text()
    assert "| good | bad | 6 | 0 | 0 |" in report
    rows = [json.loads(line) for line in battles.read_text().splitlines()]
    assert len(rows) == 6 and {r["winner"] for r in rows} == {"model_a"}
    # ... and the battles rank the checkpoints with `rlhfkit arena`.
    code = cli_main(["arena", "--battles", str(battles), "--output", str(tmp_path / "arena"),
                     "--bootstrap", "10"])
    assert code == 0
    ratings = json.loads((tmp_path / "arena" / "ratings.json").read_text())
    assert [r["model"] for r in ratings] == ["good", "bad"]


def test_single_grading_with_candidates_from_endpoint(tmp_path, stub, capsys):
    server, url = stub
    bad = _answers(tmp_path / "bad.jsonl", "weak", "BAD")
    out = tmp_path / "out"
    code = cli_main(["judge", "--judge-url", url, "--judge-model", "stub", "--answers", bad,
                     "--model-url", url, "--model-name", "cand-a", "--limit", "2",
                     "--output", str(out), "--concurrency", "2"])
    assert code == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    models = results["summary"]["models"]
    assert models["cand-a"]["score"] == 9.0 and models["weak"]["score"] == 3.0
    assert models["cand-a"]["turns"] == {"1": 9.0, "2": 9.0}
    generated = [json.loads(line) for line in (out / "answers" / "cand-a.jsonl").read_text().splitlines()]
    assert len(generated) == 2 and generated[0]["model_id"] == "cand-a"
    assert len(generated[0]["choices"][0]["turns"]) == 2
    # turn 2 was asked with the candidate's own first reply in the history
    second = [body["messages"] for body in server.seen
              if body["model"] == "cand-a" and len(body["messages"]) == 3]
    assert second and second[0][1]["role"] == "assistant" and second[0][1]["content"].startswith("GOOD")
    assert (out / "scores.png").read_bytes()[:4] == b"\x89PNG"
    assert "cand-a: 9.00 / 10" in capsys.readouterr().out


def test_chat_bench_through_endpoint(tmp_path, stub):
    _, url = stub
    from rlhfkit.evaluation.judging.data import builtin_path, load_questions

    scripts = load_questions(builtin_path("chat-bench"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"question_id": q.question_id, "model": "bad",
                                       "turns": ["BAD"] * len(q.turns)}) + "\n" for q in scripts))
    out = tmp_path / "out"
    code = cli_main(["judge", "--mode", "chat-bench", "--judge-url", url, "--judge-model", "stub",
                     "--model-url", url, "--model-name", "good", "--answers", str(bad),
                     "--output", str(out)])
    assert code == 0
    s = json.loads((out / "results.json").read_text())["summary"]["models"]
    n_turns = sum(len(q.turns) for q in scripts)
    assert s["good"]["pass_rate"] == 1.0 and s["good"]["passed"] == n_turns
    assert s["good"]["conversations_fully_passed"] == len(scripts)
    assert s["bad"]["pass_rate"] == 0.0 and s["bad"]["conversations_fully_passed"] == 0
    assert "✓" in (out / "report.md").read_text()


def test_endpoint_errors_become_clear_messages(tmp_path, stub, capsys):
    _, url = stub
    good = _answers(tmp_path / "good.jsonl", "good", "GOOD")
    code = cli_main(["judge", "--judge-url", url, "--judge-model", "unknown", "--answers", good,
                     "--limit", "1", "--output", str(tmp_path / "out")])
    assert code == 1
    err = capsys.readouterr().err
    assert "judge endpoint" in err and "HTTP 404" in err and "model 'unknown' not found" in err
    assert "Traceback" not in err


def test_unreachable_endpoint():
    backend = OpenAIChatBackend("http://127.0.0.1:9/v1", "m", retries=0, timeout=5)
    with pytest.raises(BackendError, match="cannot connect"):
        backend.complete([[{"role": "user", "content": "hi"}]])


def test_chat_completions_url():
    assert chat_completions_url("http://h:8000/v1") == "http://h:8000/v1/chat/completions"
    assert chat_completions_url("http://h:8000/v1/") == "http://h:8000/v1/chat/completions"
    assert chat_completions_url("http://h:8000") == "http://h:8000/v1/chat/completions"
    assert chat_completions_url("http://h/x/chat/completions") == "http://h/x/chat/completions"


def test_repeats_measure_the_judge_and_a_rerun_sends_nothing(tmp_path, capsys):
    """Each answer graded 3 times at temperature 0.7; the scripted grades give, by hand:

    q1: 6, 8, 7 -> mean 7, sd 1      q2: 4, 4, 4 -> mean 4, sd 0      q3: 5, 9, 7 -> mean 7, sd 2
    score = (7 + 4 + 7) / 3 = 6; SE over questions = std(7, 4, 7; ddof=1) / sqrt(3) = sqrt(3) / sqrt(3) = 1
    judge sd = (1 + 0 + 2) / 3 = 1; SE from the judge = sqrt((1 + 0 + 4) / 3) / 3 = sqrt(5/3) / 3
    """
    script = {"1": [6, 8, 7], "2": [4, 4, 4], "3": [5, 9, 7]}
    sent: dict[str, int] = {q: 0 for q in script}
    lock = threading.Lock()

    def respond(body):
        q = body["messages"][-1]["content"].rsplit("ANSWER- answer ", 1)[1][0]  # the graded answer: "... q.1"
        with lock:
            grade = script[q][sent[q]]
            sent[q] += 1
        return f"Fine. Rating: [[{grade}]]"

    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"question_id": q, "category": "writing", "turns": [f"Q{q}?"]}) + "\n"
                                 for q in script))
    answers = _answers(tmp_path / "m.jsonl", "m", "ANSWER-", qids=[1, 2, 3], turns=1)
    out = tmp_path / "out"
    argv = ["judge", "--judge-url", "", "--judge-model", "stub", "--questions", str(questions), "--answers", answers,
            "--judge-temperature", "0.7", "--repeats", "3", "--output", str(out)]
    with ScriptedEndpoint(respond) as endpoint:
        argv[2] = endpoint.url
        assert cli_main(argv) == 0, capsys.readouterr().err
        assert len(endpoint.seen) == 9 and {b["temperature"] for b in endpoint.seen} == {0.7}
        first = json.loads((out / "results.json").read_text())
        assert cli_main(argv) == 0  # the same command again: every reply is in requests.jsonl
        assert len(endpoint.seen) == 9
    m = first["summary"]["models"]["m"]
    assert (m["score"], m["graded"], m["questions"], m["repeats"]) == (6.0, 9, 3, 3)
    assert m["stderr"] == pytest.approx(1.0)
    assert m["judge_sd"] == pytest.approx(1.0) and m["judge_stderr"] == pytest.approx((5 / 3) ** 0.5 / 3)
    assert first["summary"]["per_question"] == {"1": {"m": {"1": 7.0}}, "2": {"m": {"1": 4.0}}, "3": {"m": {"1": 7.0}}}
    assert first["judge"]["repeats"] == 3
    assert json.loads((out / "results.json").read_text()) == first
    records = [json.loads(line) for line in (out / "judgments.jsonl").read_text().splitlines()]
    assert sorted((r["question_id"], r["repeat"]) for r in records) == [(q, r) for q in "123" for r in range(3)]
    report = (out / "report.md").read_text()
    assert "| m | 6.00 | 6.00 | 9 | 0 | 1.00 | 1.00 | 0.43 |" in report
    assert "judge sd 1.00, judge SE 0.43 over 3 repeats" in capsys.readouterr().out


# ---------------------------------------------------------------------------- fake judges


class ScriptedJudge:
    """A judge backend returning canned strings (cycled), recording the prompts."""

    name = "scripted"

    def __init__(self, replies):
        self.replies = list(replies)
        self.prompts = []

    def complete(self, conversations, temperature=0.0, max_tokens=512):
        out = []
        for c in conversations:
            self.prompts.append(c)
            out.append(self.replies[(len(self.prompts) - 1) % len(self.replies)])
        return out


def _cfg(tmp_path, **values):
    return build_config(Config, {"output": str(tmp_path / "out"), **values})


def test_position_biased_judge_yields_ties(tmp_path):
    a = _answers(tmp_path / "a.jsonl", "a", "x", n=4)
    b = _answers(tmp_path / "b.jsonl", "b", "y", n=4)
    cfg = _cfg(tmp_path, mode="pairwise", answers=[a, b], limit=4)
    results = run(cfg, ScriptedJudge(["I prefer the first. [[A]]"]), log=None)
    (pair,) = results["summary"]["pairs"]
    assert (pair["wins"], pair["losses"], pair["ties"], pair["inconsistent"]) == (0, 0, 8, 8)
    assert pair["consistency"] == 0.0 and pair["win_rate"] == 0.5


def test_malformed_verdicts_are_counted_and_reported(tmp_path):
    nasty = "no verdict | <b>bold</b>\n```\nbreak out"
    a = _answers(tmp_path / "a.jsonl", "evil|name", "x", n=3)
    cfg = _cfg(tmp_path, answers=[a], limit=3)
    results = run(cfg, ScriptedJudge(["Rating: [[7]]", nasty, "score 8/10", "[[42]]"]), log=None)
    health = results["judge_health"]
    assert health["judgments"] == 6 and health["malformed"] == 3 and health["lenient_parses"] == 1
    assert health["malformed_reasons"] == {"no rating found": 2, "rating 42 outside 1-10": 1}
    m = results["summary"]["models"]["evil|name"]
    assert m["graded"] == 3 and m["malformed"] == 3
    assert m["score"] == pytest.approx((7 + 8 + 7) / 3)
    report = (tmp_path / "out" / "report.md").read_text()
    assert "evil\\|name" in report and "<b>" not in report.replace("````", "")[:report.index("## Judge reliability")]
    assert "````text\nno verdict | <b>bold</b>\n```\nbreak out\n````" in report
    json.loads((tmp_path / "out" / "results.json").read_text())  # strict JSON (NaN-free)


def test_winrate_mode_and_json_battles(tmp_path):
    model = _answers(tmp_path / "m.jsonl", "model", "long " * 20, n=5)
    ref = _answers(tmp_path / "r.jsonl", "ref", "short", n=5)
    battles = tmp_path / "b.json"
    cfg = _cfg(tmp_path, mode="winrate", answers=[model, ref], baseline="ref", limit=5,
               emit_battles=str(battles))
    # model wins when shown first, ties when second: 5 wins... judged per (question, turn)
    judge = ScriptedJudge(["[[A]]", "[[B]]"])  # game 1 X=A wins, game 2 X=B wins -> consistent
    results = run(cfg, judge, log=None)
    s = results["summary"]["models"]["model"]
    assert s["win_rate"] == 1.0 and s["wins"] == 10 and s["consistency"] == 1.0
    assert 0 < s["lc_win_rate"] <= 1 and s["avg_length"] > s["reference_avg_length"]
    rows = json.loads(battles.read_text())
    assert isinstance(rows, list) and len(rows) == 10
    assert rows[0]["model_a"] == "model" and rows[0]["winner"] == "model_a"
    assert (tmp_path / "out" / "winrate.png").exists()


def test_reference_guided_prompts_for_math(tmp_path):
    a = _answers(tmp_path / "a.jsonl", "a", "x")
    cfg = _cfg(tmp_path, answers=[a], categories=["math"])
    judge = ScriptedJudge(["[[5]]"])
    run(cfg, judge, log=None)
    assert len(judge.prompts) == 6  # 3 math questions x 2 turns
    assert all("Reference answer" in p[-1]["content"] for p in judge.prompts)
    records = [json.loads(x) for x in (tmp_path / "out" / "judgments.jsonl").read_text().splitlines()]
    assert all(r["reference_guided"] for r in records)


def test_reference_answers_file_fills_missing_references(tmp_path):
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"question_id": 7, "category": "math", "turns": ["1+1?"]}) + "\n")
    refs = _answers(tmp_path / "gpt.jsonl", "gpt", "2", qids=[7], turns=1)
    a = _answers(tmp_path / "a.jsonl", "a", "x", qids=[7], turns=1)
    judge = ScriptedJudge(["[[5]]"])
    run(_cfg(tmp_path, questions=str(q), answers=[a], reference_answers=refs), judge, log=None)
    assert "[Reference answer]\n2 answer 7.1" in judge.prompts[0][-1]["content"]


def test_missing_answers_are_skipped_and_counted(tmp_path):
    a = _answers(tmp_path / "a.jsonl", "a", "x", qids=[1, 2], turns=1)
    results = run(_cfg(tmp_path, answers=[a], limit=3), ScriptedJudge(["[[6]]"]), log=None)
    assert results["judge_health"]["judgments"] == 2
    assert results["missing_answers"] == {"a": 4}


# ---------------------------------------------------------------------------- validation


@pytest.mark.parametrize("argv, message", [
    ([], "no candidates"),
    (["--answers", "nope.jsonl"], "--answers: no such file"),
    (["--answers", "{a}", "--emit-battles", "b.jsonl"], "--emit-battles needs --mode pairwise"),
    (["--answers", "{a}", "--mode", "winrate"], "--mode winrate needs --baseline"),
    (["--answers", "{a}", "--judge-url", "http://x/v1"], "--judge-url needs --judge-model"),
    (["--answers", "{a}", "--mode", "pairwise", "--judge-url", "http://x/v1", "--judge-model", "j"],
     "needs at least two candidates"),
    (["--answers", "{a}", "--mode", "winrate", "--baseline", "zz", "--judge-url",
      "http://x/v1", "--judge-model", "j"], "--baseline 'zz' is not among"),
    (["--model-url", "http://x/v1"], "--model-url needs --model-name"),
    (["--answers", "{a}", "--model-url", "http://x/v1", "--model-name", "a"],
     "candidate names given twice"),
    (["--answers", "{a}", "--mode", "pairwise"], "needs at least two candidates"),
    (["--answers", "{a}", "--repeats", "3"], "--repeats needs --judge-temperature > 0"),
    (["--answers", "{a}", "--repeats", "0"], "--repeats must be >= 1"),
    (["--answers", "{a}", "{a}", "--mode", "pairwise", "--repeats", "2", "--judge-temperature", "1"],
     "--repeats needs --mode single"),
])
def test_judge_flag_problems_exit_2(tmp_path, capsys, argv, message):
    a = _answers(tmp_path / "a.jsonl", "a", "x")
    argv = [x.replace("{a}", a) for x in argv]
    code = cli_main(["judge", "--output", str(tmp_path / "out"), *argv])
    assert code == 2
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------------------- local model


def test_local_tiny_model_as_judge_and_candidate(tmp_path, capsys):
    from rlhfkit.models.tiny import make_tiny_causal_lm

    path = make_tiny_causal_lm(tmp_path / "tiny")
    out = tmp_path / "out"
    code = cli_main(["judge", "--judge-model", str(path), "--model", str(path), "--limit", "1",
                     "--max-new-tokens", "4", "--judge-max-new-tokens", "6", "--output", str(out)])
    assert code == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    health = results["judge_health"]
    assert health["judgments"] == 2  # one two-turn question
    m = results["summary"]["models"][str(path)]
    assert m["graded"] + m["malformed"] == 2  # a random model's verdicts are counted, not fatal
    assert (out / "answers").is_dir() and (out / "report.md").exists()


@pytest.mark.parametrize("command", ["judge", "arena"])
def test_help_renders(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main([command, "--help"])
    assert e.value.code == 0
    assert "--output" in capsys.readouterr().out
