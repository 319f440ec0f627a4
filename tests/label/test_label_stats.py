"""The statistics, checked against values worked out by hand (the Likert rule: tests/data/test_likert.py)."""

from __future__ import annotations

import pytest

from rlhfkit.label.stats import (
    Vote,
    agreement_summary,
    annotator_stats,
    item_stats,
    krippendorff_alpha_nominal,
    majority,
    pairwise_agreement,
    position_bias,
    throughput,
    wilson_interval,
)


def test_alpha_hand_worked():
    """Units [a,a] [a,b] [b,b] [a,a,b].

    Coincidences (each ordered pair of values within a unit weighted 1/(m-1)):
      [a,a]   -> o_aa += 2
      [a,b]   -> o_ab += 1, o_ba += 1
      [b,b]   -> o_bb += 2
      [a,a,b] -> o_aa += 2/2, o_ab += 2/2, o_ba += 2/2
    so o_aa = 3, o_ab = o_ba = 2, o_bb = 2; n_a = 5, n_b = 4, n = 9.
    D_o = 4, D_e = (5*4 + 4*5) / 8 = 5, alpha = 1 - 4/5 = 0.2.
    """
    units = [["a", "a"], ["a", "b"], ["b", "b"], ["a", "a", "b"]]
    assert krippendorff_alpha_nominal(units) == pytest.approx(0.2)
    # Pairwise: 1/1 + 0/1 + 1/1 + 1/3 pairs agree -> 3 of 6.
    assert pairwise_agreement(units) == pytest.approx(0.5)


def test_alpha_extremes():
    assert krippendorff_alpha_nominal([["a", "a"], ["b", "b"], ["a", "a", "a"]]) == pytest.approx(1.0)
    # Two coders who always disagree: o_ab = o_ba = 4, n_a = n_b = 4, n = 8;
    # D_o = 8, D_e = 32/7, alpha = 1 - 56/32 = -0.75.
    assert krippendorff_alpha_nominal([["a", "b"], ["b", "a"]] * 2) == pytest.approx(-0.75)
    # Undefined: every value the same (no expected disagreement), or nothing pairable.
    assert krippendorff_alpha_nominal([["a", "a"], ["a", "a"]]) is None
    assert krippendorff_alpha_nominal([["a"], ["b"]]) is None
    assert krippendorff_alpha_nominal([]) is None


def test_majority():
    assert majority(["response_a", "response_b", "response_a"]) == "response_a"
    assert majority(["response_b"]) == "response_b"
    assert majority(["response_a", "response_b"]) is None
    assert majority([]) is None


def test_wilson_interval():
    # 8 of 10: p = 0.8, z = 1.96 -> (0.4902, 0.9433), the textbook values.
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-3)
    assert hi == pytest.approx(0.9433, abs=1e-3)
    assert wilson_interval(0, 0) is None


def _v(item, user, pref, likert=2, left="response_a", t=0.0, secs=10.0):
    return Vote(item, user, pref, likert, left, t, secs)


def test_item_annotator_position_and_throughput():
    A, B = "response_a", "response_b"
    votes = [
        # item 1: users 1, 2 say A, user 3 says B
        _v(1, 1, A, 1, left=A, t=0), _v(1, 2, A, 3, left=B, t=10), _v(1, 3, B, 8, left=B, t=20),
        # item 2: users 1 and 2 split; user 3 says B
        _v(2, 1, A, 2, left=A, t=3600), _v(2, 2, B, 6, left=A, t=30), _v(2, 3, B, 7, left=B, t=40),
        # item 3: only user 1
        _v(3, 1, B, 5, left=A, t=7200),
    ]
    items = item_stats(votes)
    assert items[1]["majority"] == A and items[1]["agreement"] == pytest.approx(2 / 3)
    assert items[2]["majority"] == B and items[2]["votes_b"] == 2
    assert items[3]["agreement"] == 1.0 and items[3]["n"] == 1

    users = annotator_stats(votes)
    # user 1: item 1 others {A, B} split -> not compared; item 2 others {B, B} -> B, user says A;
    # item 3 has no others. 1 compared, 0 matched.
    assert users[1]["compared"] == 1 and users[1]["agreement"] == 0.0
    # user 3: item 1 others {A, A} -> A (user says B: miss); item 2 others {A, B} split. 0 of 1.
    assert users[3]["compared"] == 1 and users[3]["agreement"] == 0.0
    # user 2: item 1 others {A, B} split; item 2 others {A, B} split -> nothing to compare.
    assert users[2]["compared"] == 0 and users[2]["agreement"] is None
    # user 1 spent 10 s on each of 3 items: 3 judgments per 30 s of judging = 360 per hour.
    assert users[1]["per_hour"] == pytest.approx(360.0)
    assert users[1]["left_win_rate"] == pytest.approx(2 / 3)  # A on left won twice, lost once

    pb = position_bias(votes)
    # left won in: (1,1) (1,3) (2,1) (2,3): 4 of 7
    assert pb["n"] == 7 and pb["left_wins"] == 4 and pb["rate"] == pytest.approx(4 / 7)

    tp = throughput(votes, at=7200.5)
    assert tp["judgments"] == 7 and tp["last_hour"] == 1 and tp["last_day"] == 7
    assert tp["per_hour"] == pytest.approx(6 / 2)  # 6 judgments after the first, over 2 hours
    assert throughput(votes[:3], at=100)["per_hour"] is None  # 20 s apart: too short to say
    slow = [_v(1, 1, A, secs=5000), _v(2, 1, A, secs=200)]  # a break counts as 10 minutes
    assert annotator_stats(slow)[1]["per_hour"] == pytest.approx(3600 * 2 / 800)
    assert tp["median_seconds"] == 10.0

    ag = agreement_summary(votes)
    assert ag["items_with_2plus"] == 2 and ag["disagreeing_items"] == 2
    # item 1 [A, A, B] and item 2 [A, B, B]: o_AA = 1, o_AB = o_BA = 2, o_BB = 1 (each 3-unit adds
    # 2/2 per same pair, 2/2 per cross pair in each direction): n_A = n_B = 3, n = 6;
    # D_o = 4, D_e = 18/5, alpha = 1 - 20/18 = -1/9.
    assert ag["krippendorff_alpha"] == pytest.approx(-1 / 9)
