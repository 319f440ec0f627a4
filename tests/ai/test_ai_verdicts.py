"""Reading a judge's verdict and its soft label (rlhfkit.label.verdicts), worked by hand."""

from __future__ import annotations

import math

import pytest

from rlhfkit.label.verdicts import Verdict, choice_of_token, p_first_of_pair, read_verdict
from rlhfkit.models.backends import Reply, TokenLogprob


@pytest.mark.parametrize("text, letter", [
    ("[[A]]", "A"),                                          # alone
    ("[[B]] because it is kinder and more accurate.", "B"),  # text after the verdict
    ("Both are fine.\n[[c]]", "C"),                          # lower case
    ("Reply A quotes [[B]] but in the end: [[A]]", "A"),     # the last double-bracket wins
    ("Verdict: [[tie]]", "C"),
    ("**[[ B ]]**", "B"),
])
def test_every_verdict_variant_is_read(text, letter):
    assert read_verdict(Reply(text)) == Verdict(letter, None, None)


@pytest.mark.parametrize("text", ["I cannot decide between them.", "", "[[D]]"])
def test_a_missing_verdict_is_unparsed_with_its_reason(text):
    verdict = read_verdict(Reply(text))
    assert verdict.letter is None and verdict.probs is None and verdict.problem


@pytest.mark.parametrize("token, choice", [
    ("A", "A"), (" b", "B"), ("[[C", "C"), ("A]]", "A"), ("[[B]]\n", "B"), (" tie", "C"),
    ("[[", None), ("The", None), ("AB", None),
])
def test_tokens_are_read_as_choices(token, choice):
    assert choice_of_token(token) == choice


def tok(text, p, **alternatives):
    """A token with probability p and the alternatives' probabilities (as log-probs)."""
    return TokenLogprob(text, math.log(p), {text: math.log(p), **{k: math.log(v) for k, v in alternatives.items()}})


def test_soft_label_from_a_letter_token_of_its_own():
    # "[[" then "A": P over the choices at the letter, normalised: .6 / .3 / .1 (sums to 1 already).
    reply = Reply("Kinder: [[A]]", (tok("Kinder:", 0.9), tok(" [[", 0.8), tok("A", 0.6, B=0.3, C=0.1),
                                    tok("]]", 0.99)))
    verdict = read_verdict(reply)
    assert verdict.letter == "A"
    assert verdict.probs == pytest.approx({"A": 0.6, "B": 0.3, "C": 0.1})
    assert verdict.p_first == pytest.approx(0.6 + 0.1 / 2)


def test_soft_label_from_a_tokenizer_that_merges_the_brackets_and_the_letter():
    # "[[B" is one token; its alternatives "[[A", "[[C" are choices, "[[" is not (ignored):
    # P(B) = .5 / (.5 + .25 + .125), P(A) = .25 / .875, P(C) = .125 / .875.
    alternatives = {"[[A": 0.25, "[[C": 0.125, "[[": 0.125}
    reply = Reply("[[B]]", (TokenLogprob("[[B", math.log(0.5), {"[[B": math.log(0.5), **{
        k: math.log(v) for k, v in alternatives.items()}}), tok("]]", 0.99)))
    verdict = read_verdict(reply)
    assert verdict.letter == "B"
    assert verdict.probs == pytest.approx({"A": 0.25 / 0.875, "B": 0.5 / 0.875, "C": 0.125 / 0.875})
    assert verdict.p_first == pytest.approx((0.25 + 0.0625) / 0.875)


def test_soft_label_sums_the_spellings_of_one_choice():
    # " A" and "A" are both A: P(A) = (.4 + .2) / (.4 + .2 + .3 + .1).
    reply = Reply("Verdict: [[ A]]", (tok("Verdict: [[", 0.9), TokenLogprob(" A", math.log(0.4), {
        " A": math.log(0.4), "A": math.log(0.2), " B": math.log(0.3), "C": math.log(0.1)}), tok("]]", 0.9)))
    assert read_verdict(reply).probs == pytest.approx({"A": 0.6, "B": 0.3, "C": 0.1})


def test_no_soft_label_without_log_probs_or_when_the_tokens_do_not_spell_the_reply():
    assert read_verdict(Reply("[[A]]")).probs is None
    assert read_verdict(Reply("[[A]]", (tok("something else", 0.5),))).probs is None


def test_the_two_orders_are_averaged_from_the_first_replys_side():
    # a shown first: p_first .65; a shown second: the reply shown first (b) has p_first .35714...
    # so P(a) = (.65 + 1 - .357142857) / 2 = .646428...
    first = Verdict("A", {"A": 0.6, "B": 0.3, "C": 0.1})
    second = Verdict("B", {"A": 0.25 / 0.875, "B": 0.5 / 0.875, "C": 0.125 / 0.875})
    assert p_first_of_pair(first, second) == pytest.approx((0.65 + 1 - 0.3125 / 0.875) / 2)
    assert p_first_of_pair(first, Verdict("B")) is None
