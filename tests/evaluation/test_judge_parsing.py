"""Reading verdicts from judge text, including malformed output."""

from __future__ import annotations

import pytest

from rlhfkit.evaluation.judging.parsing import parse_pairwise, parse_pass_fail, parse_rating


@pytest.mark.parametrize("text, value, pattern", [
    ("Good answer.\nRating: [[7]]", 7.0, "double-bracket"),
    ("[[7.5]]", 7.5, "double-bracket"),
    ("Final: **[[ 9 ]]**", 9.0, "double-bracket"),
    ("[[8/10]]", 8.0, "double-bracket"),
    ("[[Rating: 6]]", 6.0, "double-bracket"),
    ("On a scale from [[1]] to [[10]] ... I give [[4]]", 4.0, "double-bracket"),  # last wins
    ("I'd say [[3]]. Corrected rating: [[5]]", 5.0, "double-bracket"),
    ("Score quoted: [6]; strict later: [[2]]", 2.0, "double-bracket"),  # strict beats fallback
    ("The rating is [8].", 8.0, "single-bracket"),
    ("Rating: 7", 7.0, "rating-label"),
    ("Score = 6.5 overall", 6.5, "rating-label"),
    ("Rating: **8**", 8.0, "rating-label"),
    ("I would give this 9/10.", 9.0, "out-of-ten"),
    ("solid work, 7 out of 10", 7.0, "out-of-ten"),
    ("[[10]]", 10.0, "double-bracket"),
    ("[[1]]", 1.0, "double-bracket"),
])
def test_parse_rating_accepts(text, value, pattern):
    parsed = parse_rating(text)
    assert parsed.ok and parsed.value == value and parsed.pattern == pattern
    assert parsed.strict == (pattern == "double-bracket")


@pytest.mark.parametrize("text, problem", [
    ("", "empty judgment"),
    (None, "empty judgment"),
    ("   \n", "empty judgment"),
    ("This answer is fine I guess.", "no rating found"),
    ("Rating: [[11]]", "rating 11 outside 1-10"),
    ("[[0]]", "rating 0 outside 1-10"),
    ("Rating: [[seven]]", "no rating found"),
    ("The code uses arr[3] and x[0].", "no rating found"),  # indexing is not a rating
    ("\x00\x01 garbage ]]]][[[[", "no rating found"),
])
def test_parse_rating_malformed_never_raises(text, problem):
    parsed = parse_rating(text)
    assert not parsed.ok and parsed.value is None
    assert parsed.problem == problem


@pytest.mark.parametrize("text, value", [
    ("A is more accurate. [[A]]", "A"),
    ("[[B]]", "B"),
    ("Both equally good. [[C]]", "C"),
    ("[[ tie ]]", "C"),
    ("[[b]]", "B"),
    ("Compared [A] and [B]... final [[A]]", "A"),
    ("Verdict: B", "B"),
    ("My final verdict is: **Assistant A**", "A"),
    ("I pick [B].", "B"),
])
def test_parse_pairwise(text, value):
    assert parse_pairwise(text).value == value


@pytest.mark.parametrize("text", ["", "Both have merits.", "[[D]]", "Answer A is better."])
def test_parse_pairwise_malformed(text):
    parsed = parse_pairwise(text)
    assert parsed.value is None and parsed.problem


@pytest.mark.parametrize("text, value", [
    ("It remembers the name. [[PASS]]", "PASS"),
    ("[[fail]]", "FAIL"),
    ("The rule says [[PASS]] or [[FAIL]]... here: [[FAIL]]", "FAIL"),
    ("Verdict: PASS", "PASS"),
    ("[PASS]", "PASS"),
])
def test_parse_pass_fail(text, value):
    assert parse_pass_fail(text).value == value


def test_parse_pass_fail_malformed():
    assert parse_pass_fail("it is fine").value is None
    assert parse_pass_fail("").problem == "empty judgment"


def test_disagreeing_fallback_matches_are_ambiguous_not_guessed():
    # A weak judge enumerating "[1] ... [5]" has not given a rating.
    enumerated = "[1] helpful.\n[2] helpful.\n[3] helpful.\n[5] helpful.\n[6"
    parsed = parse_rating(enumerated)
    assert parsed.value is None and parsed.problem.startswith("ambiguous verdict")
    # ...but a later, agreeing fallback is still used, and repeated agreeing matches are fine.
    assert parse_rating("[1] ok [2] fine. Rating: 6").value == 6.0
    assert parse_rating("I give [7]. Again: [7]").value == 7.0
    assert parse_pairwise("Compared [A] and [B] carefully.").value is None
    assert parse_pairwise("Compared [A] and [B]. Verdict: A").value == "A"
