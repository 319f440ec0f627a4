"""Each judge mode's typed summary on a tiny fixed set of judgments, the numbers worked by hand."""

from __future__ import annotations

import math
import typing

import pytest

from rlhfkit.evaluation.judge import Mode
from rlhfkit.evaluation.judging.calls import Call, Judged
from rlhfkit.evaluation.judging.data import Question
from rlhfkit.evaluation.judging.modes import MODES, JudgedRun
from rlhfkit.evaluation.judging.modes.chat_bench import ChatBenchSummary
from rlhfkit.evaluation.judging.modes.pairwise import PairwiseSummary
from rlhfkit.evaluation.judging.modes.single import ModelGrades, SingleSummary
from rlhfkit.evaluation.judging.modes.winrate import WinRateSummary
from rlhfkit.evaluation.judging.parsing import parse_pairwise, parse_pass_fail, parse_rating
from rlhfkit.evaluation.winrate import instruction_difficulty, length_controlled_win_rate


def test_the_registry_holds_every_mode_under_its_flag_value():
    assert list(MODES) == ["single", "pairwise", "winrate", "chat-bench"]
    assert set(MODES) == set(typing.get_args(Mode))
    assert all(mode.name == name for name, mode in MODES.items())
    assert [n for n, m in MODES.items() if m.emits_battles] == ["pairwise", "winrate"]
    assert [n for n, m in MODES.items() if m.needs_reference] == ["winrate"]
    assert MODES["chat-bench"].question_set == "chat-bench" and MODES["chat-bench"].needs_checks


def _judged(kind, text, **meta):
    parse = {"single": parse_rating, "pairwise": parse_pairwise, "chat-bench": parse_pass_fail}[kind]
    return Judged(Call(kind, meta, []), text, parse(text))


# ---------------------------------------------------------------------------- single

def test_single_summary():
    # a: 8, 6 on q1 (writing), 4 on q2 (math)     -> mean 6; turn 1: (8+4)/2 = 6, turn 2: 6
    # b: 9, malformed on q1, lenient 5 on q2      -> mean (9+5)/2 = 7, one malformed, no turn-2 mean
    judged = [_judged("single", t, question_id=q, category=c, turn=turn, model=m) for m, q, c, turn, t in [
        ("a", 1, "writing", 1, "[[8]]"), ("a", 1, "writing", 2, "[[6]]"), ("a", 2, "math", 1, "[[4]]"),
        ("b", 1, "writing", 1, "[[9]]"), ("b", 1, "writing", 2, "no verdict"), ("b", 2, "math", 1, "Rating: 5")]]
    s = MODES["single"].summarize(JudgedRun([], {}, ["a", "b"], judged, "j"))
    assert isinstance(s, SingleSummary)
    # Standard error over questions, the question as the cluster (spread.stderr_over_questions):
    # a: residuals from 6 summed per question: q1 (8-6)+(6-6) = 2, q2 4-6 = -2 -> sqrt(2/1 * 8) / 3 = 4/3
    # b: q1 9-7 = 2, q2 5-7 = -2 -> sqrt(2/1 * 8) / 2 = 2 (= std(9, 5; ddof=1) / sqrt(2): one score per question)
    def grades(g: ModelGrades) -> tuple:
        return g.score, g.graded, g.malformed, g.turns, g.categories, g.questions, g.repeats

    assert grades(s.models["a"]) == (6.0, 3, 0, {"1": 6.0, "2": 6.0}, {"math": 4.0, "writing": 7.0}, 2, 1)
    assert grades(s.models["b"]) == (7.0, 2, 1, {"1": 7.0}, {"math": 5.0, "writing": 9.0}, 2, 1)
    assert (s.models["a"].stderr, s.models["b"].stderr) == (pytest.approx(4 / 3), pytest.approx(2.0))
    assert math.isnan(s.models["a"].judge_sd) and math.isnan(s.models["a"].judge_stderr)  # one grade per answer
    assert s.to_dict()["per_question"] == {"1": {"a": {"1": 8.0, "2": 6.0}, "b": {"1": 9.0, "2": None}},
                                           "2": {"a": {"1": 4.0}, "b": {"1": 5.0}}}
    assert s.battles == ()
    report = "\n".join(s.report_lines())
    # best first; b has no turn-2 mean
    assert report.index("| b | 7.00 | 7.00 | — | 2 | 1 |") < report.index("| a | 6.00 | 6.00 | 6.00 | 3 | 0 |")
    assert "| 1 | 8.0 / 6.0 | 9.0 / × |" in report
    assert "| a | 6.00 | 6.00 | 6.00 | 3 | 0 | 1.33 |" in report and "| judge sd |" not in report
    assert s.console_lines() == ["  a: 6.00 / 10 ± 1.33 (3 graded, 0 malformed)",
                                 "  b: 7.00 / 10 ± 2.00 (2 graded, 1 malformed)"]


# ---------------------------------------------------------------------------- pairwise

def _games(pairs):
    """Both games of each comparison: (x, y, question, verdict of game 1, verdict of game 2)."""
    out = []
    for x, y, q, v1, v2 in pairs:
        base = {"question_id": q, "category": "c", "turn": 1, "model_x": x, "model_y": y}
        out.append(_judged("pairwise", v1, **base, game=1, model_a=x, model_b=y))
        out.append(_judged("pairwise", v2, **base, game=2, model_a=y, model_b=x))
    return out


def test_pairwise_summary(tmp_path):
    judged = _games([
        ("x", "y", 1, "[[A]]", "[[B]]"),   # x wins, consistent
        ("x", "y", 2, "[[A]]", "[[A]]"),   # first answer both times: tie, inconsistent
        ("x", "z", 1, "[[B]]", "[[A]]"),   # x loses, consistent
        ("x", "z", 2, "[[C]]", "junk"),    # malformed: invalid
        ("y", "z", 1, "[[C]]", "[[C]]"),   # tie, consistent
    ])
    s = MODES["pairwise"].summarize(JudgedRun([], {}, ["x", "y", "z"], judged, "j", seed=0))
    assert isinstance(s, PairwiseSummary)
    got = {(p.model_a, p.model_b): p.stats for p in s.pairs}
    xy, xz, yz = got["x", "y"], got["x", "z"], got["y", "z"]
    assert (xy.pairs, xy.wins, xy.losses, xy.ties, xy.inconsistent, xy.invalid) == (2, 1, 0, 1, 1, 0)
    assert (xy.win_rate, xy.consistency) == (0.75, 0.5)          # (1 + 1/2) / 2; 1 of 2 agreed
    assert (xz.wins, xz.losses, xz.ties, xz.invalid, xz.win_rate, xz.consistency) == (0, 1, 0, 1, 0.0, 1.0)
    assert (yz.ties, yz.win_rate, yz.consistency) == (1, 0.5, 1.0)
    # per model, seen from its own side: x = win, tie, loss, invalid; y = loss, tie, tie; z = win, invalid, tie
    assert [(v.wins, v.losses, v.ties, v.invalid) for v in s.models.values()] == [(1, 1, 1, 1), (0, 1, 2, 0),
                                                                                   (1, 0, 1, 1)]
    assert [s.models[m].win_rate for m in "xyz"] == [pytest.approx(1.5 / 3), pytest.approx(1 / 3), 0.75]
    # overall: 5 comparisons, 4 decided, 1 of them inconsistent
    assert (s.comparisons, s.invalid_pairs, s.inconsistent, s.consistency) == (5, 1, 1, 0.75)
    assert [(b["model_a"], b["model_b"], b["winner"]) for b in s.battles] == [
        ("x", "y", "model_a"), ("x", "y", "tie"), ("x", "z", "model_b"), ("y", "z", "tie")]
    d = s.to_dict()
    assert list(d) == ["pairs", "models", "consistency", "inconsistent", "invalid_pairs", "comparisons", "ratings"]
    assert d["pairs"][0] == {"model_a": "x", "model_b": "y", "pairs": 2, "wins": 1, "losses": 0, "ties": 1,
                             "inconsistent": 1, "invalid": 0, "win_rate": 0.75, "consistency": 0.5}
    assert {r["model"]: r["battles"] for r in d["ratings"]} == {"x": 3, "y": 3, "z": 2}
    assert "| x | y | 1 | 0 | 1 | 1 | 0 | 75.0% | 50.0% |" in "\n".join(s.report_lines())
    s.write_plots(tmp_path)
    assert (tmp_path / "ratings.png").read_bytes()[:4] == b"\x89PNG"
    assert s.console_lines()[0] == "  x vs y: 1-0-1 (win rate 0.750, consistency 0.500)"


def test_pairwise_summary_without_a_decided_comparison_has_no_ratings(tmp_path):
    s = MODES["pairwise"].summarize(JudgedRun([], {}, ["x", "y"], _games([("x", "y", 1, "junk", "[[A]]")]), "j"))
    assert s.battles == [] and s.ratings is None and "ratings" not in s.to_dict()
    assert math.isnan(s.consistency) and s.invalid_pairs == 1
    s.write_plots(tmp_path)
    assert not (tmp_path / "ratings.png").exists()


# ---------------------------------------------------------------------------- winrate

def test_winrate_summary():
    answers = {"m": {"1": ["aaaa"], "2": ["aaaaaa"], "3": ["aa"], "4": ["a"]},
               "ref": {"1": ["bb"], "2": ["bb"], "3": ["bb"], "4": ["bbbbbbbb"]}}
    judged = _games([
        ("m", "ref", 1, "[[A]]", "[[B]]"),   # win
        ("m", "ref", 2, "[[B]]", "[[A]]"),   # loss
        ("m", "ref", 3, "[[A]]", "[[A]]"),   # tie, inconsistent
        ("m", "ref", 4, "junk", "[[B]]"),    # invalid: its lengths are left out
    ])
    s = MODES["winrate"].summarize(JudgedRun([], answers, ["m", "ref"], judged, "j", reference_model="ref"))
    assert isinstance(s, WinRateSummary) and s.reference_model == "ref" and list(s.models) == ["m"]
    v = s.models["m"]
    assert (v.comparisons, v.wins, v.losses, v.ties, v.invalid, v.inconsistent) == (4, 1, 1, 1, 1, 1)
    # preferences 1, 0, 0.5: mean 0.5, population std sqrt(1/6), standard error sqrt(1/6) / sqrt(3)
    assert v.win_rate == 0.5 and v.stderr == pytest.approx(math.sqrt(1 / 18))
    assert v.consistency == pytest.approx(2 / 3)
    assert (v.avg_length, v.reference_avg_length) == (4.0, 2.0)   # (4 + 6 + 2) / 3, (2 + 2 + 2) / 3
    lc = length_controlled_win_rate([1.0, 0.0, 0.5], [4, 6, 2], [2, 2, 2])
    assert (v.lc_win_rate, v.lc_stderr, v.length_coef) == (lc.lc_win_rate, lc.stderr, lc.length_coef)
    assert [b["winner"] for b in s.battles] == ["model_a", "model_b", "tie"]
    assert list(s.to_dict()) == ["reference_model", "models"]
    assert s.to_dict()["models"]["m"]["wins"] == 1
    assert s.console_lines() == [f"  m vs ref: win rate 0.500, LC {lc.lc_win_rate:.3f}"]


def test_winrate_with_two_candidates_adds_the_difficulty_term():
    """Two candidates against one reference on 20 questions: the difficulty comes from both."""
    qs = range(1, 21)
    lengths = {"m": [2 + q % 7 for q in qs], "n": [9 - q % 5 for q in qs]}
    answers = {x: {str(q): ["a" * n] for q, n in zip(qs, lengths[x])} for x in lengths}
    answers["ref"] = {str(q): ["b" * 4] for q in qs}
    prefs = {"m": [0.0 if q % 3 == 0 else 1.0 for q in qs], "n": [1.0 if q % 4 == 0 or q % 3 else 0.5 for q in qs]}
    verdicts = {1.0: ("[[A]]", "[[B]]"), 0.0: ("[[B]]", "[[A]]"), 0.5: ("[[C]]", "[[C]]")}
    judged = _games([(x, "ref", q, *verdicts[p]) for x in ("m", "n") for q, p in zip(qs, prefs[x])])
    s = MODES["winrate"].summarize(JudgedRun([], answers, ["m", "n", "ref"], judged, "j", reference_model="ref"))
    gamma, c = instruction_difficulty(prefs["m"] + prefs["n"], ["m"] * 20 + ["n"] * 20,
                                      [f"{q}:1" for q in qs] * 2, lengths["m"] + lengths["n"], [4] * 40)
    # treatment coding: the first instruction in sorted order ("10:1") is the zero
    assert s.difficulty == gamma and s.difficulty_c == c and gamma["10:1"] == 0.0 and len(gamma) == 20
    for x in ("m", "n"):
        lc = length_controlled_win_rate(prefs[x], lengths[x], [4] * 20, difficulty=[gamma[f"{q}:1"] for q in qs])
        v = s.models[x]
        assert (v.lc_difficulty_win_rate, v.lc_difficulty_stderr, v.difficulty_coef) == (
            lc.lc_win_rate, lc.stderr, lc.difficulty_coef)
        assert v.lc_win_rate == length_controlled_win_rate(prefs[x], lengths[x], [4] * 20).lc_win_rate
        assert 0 < v.lc_difficulty_win_rate < 1
    assert s.to_dict()["instruction_difficulty"] == {"c": c, "values": gamma}
    assert "| LC + difficulty |" in "\n".join(s.report_lines())
    assert s.console_lines()[0].endswith(f", LC + difficulty {s.models['m'].lc_difficulty_win_rate:.3f}")


# ---------------------------------------------------------------------------- chat-bench

def test_chat_bench_summary():
    questions = [Question("s1", "memory", ["t1", "t2"], checks=["c1", "c2"]),
                 Question("s2", "format", ["t1", "t2"], checks=["c1", "c2"])]
    judged = [_judged("chat-bench", t, question_id=q, category=c, turn=turn, model=m) for m, q, c, turn, t in [
        ("m", "s1", "memory", 1, "[[PASS]]"), ("m", "s1", "memory", 2, "[[PASS]]"),
        ("m", "s2", "format", 1, "[[PASS]]"), ("m", "s2", "format", 2, "eh"),        # malformed
        ("n", "s1", "memory", 1, "[[FAIL]]"), ("n", "s1", "memory", 2, "[PASS]"),
        ("n", "s2", "format", 1, "[[PASS]]")]]                                      # turn 2 unanswered
    s = MODES["chat-bench"].summarize(JudgedRun(questions, {}, ["m", "n"], judged, "j"))
    assert isinstance(s, ChatBenchSummary)
    m, n = s.models["m"], s.models["n"]
    # m: 3 of 3 readable replies passed; only s1 is complete (s2 has a malformed verdict) and fully passed
    assert (m.pass_rate, m.passed, m.graded, m.malformed) == (1.0, 3, 3, 1)
    assert (m.conversations_fully_passed, m.conversations_graded) == (1, 1)
    assert m.per_conversation == {"s1": ["PASS", "PASS"], "s2": ["PASS", None]}
    # n: 2 of 3 passed; s1 complete but failed on turn 1, s2 incomplete
    assert (n.pass_rate, n.passed, n.graded, n.malformed) == (pytest.approx(2 / 3), 2, 3, 0)
    assert (n.conversations_fully_passed, n.conversations_graded) == (0, 1)
    assert n.turns == {"1": 0.5, "2": 1.0} and n.categories == {"format": 1.0, "memory": 0.5}
    assert s.to_dict()["models"]["n"]["per_conversation"] == {"s1": ["FAIL", "PASS"], "s2": ["PASS"]}
    report = "\n".join(s.report_lines())
    assert "| s1 | ✓ ✓ | ✗ ✓ |" in report and "| s2 | ✓ ? | ✓ |" in report
    assert s.console_lines() == ["  m: pass rate 1.000 (3/3)", "  n: pass rate 0.667 (2/3)"]
