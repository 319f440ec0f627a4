"""Arena ratings: Elo by hand, Bradley–Terry recovery, bootstrap, the CLI end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from rlhfkit.cli import main as cli_main
from rlhfkit.errors import InputError
from rlhfkit.evaluation.arena import (
    Battle,
    compute_elo,
    fit_bradley_terry,
    load_battles,
    rate,
    theta_to_rating,
    win_counts,
)


def test_elo_matches_hand_calculation():
    """K = 4, base 10, scale 400, everyone starts at 1000.

    1. A beats B.  E_A = 1 / (1 + 10^0) = 0.5; Δ = 4 (1 - 0.5) = 2  ->  A 1002, B 998.
    2. B beats A.  E_B = 1 / (1 + 10^((1002 - 998) / 400)) = 1 / (1 + 10^0.01)
                       = 1 / 2.0232930 = 0.4942438;  Δ = 4 (1 - 0.4942438) = 2.0230248
                   ->  B 1000.0230248, A 999.9769752.
    3. C (new, 1000) ties A.  E_C = 1 / (1 + 10^((999.9769752 - 1000) / 400))
                       = 1 / (1 + 10^-0.0000575620) = 1 / 1.9998675 = 0.5000331;
                   Δ = 4 (0.5 - 0.5000331) = -0.0001325
                   ->  C 999.9998675, A 999.9771077.
    """
    battles = [Battle("A", "B", "model_a"), Battle("B", "A", "model_a"), Battle("C", "A", "tie")]
    after1 = compute_elo(battles[:1])
    assert after1 == pytest.approx({"A": 1002.0, "B": 998.0})
    after2 = compute_elo(battles[:2])
    assert after2["B"] == pytest.approx(1000.0230248, abs=1e-6)
    assert after2["A"] == pytest.approx(999.9769752, abs=1e-6)
    after3 = compute_elo(battles)
    assert after3["C"] == pytest.approx(999.9998675, abs=1e-6)
    assert after3["A"] == pytest.approx(999.9771077, abs=1e-6)
    assert after3["B"] == pytest.approx(1000.0230248, abs=1e-6)
    # Elo is zero-sum: the mean stays at the initial rating.
    assert sum(after3.values()) / 3 == pytest.approx(1000.0)


def test_elo_tie_bothbad_is_a_tie():
    a = compute_elo([Battle("A", "B", "model_a"), Battle("A", "B", "tie")])
    b = compute_elo([Battle("A", "B", "model_a"), Battle("A", "B", "tie (bothbad)")])
    assert a == b


def test_bt_two_models_closed_form_with_half_wins():
    # A: 2 wins + 2 ties (= 3 wins), B: 0 wins + 2 ties (= 1 win) -> P(A beats B) = 3/4,
    # so r_A - r_B = 400 log10(3) = 190.85; centred on 1000.
    battles = [Battle("A", "B", "model_a")] * 2 + [Battle("A", "B", "tie"), Battle("B", "A", "tie")]
    result = rate(battles, bootstrap=0)
    gap = 400 * math.log10(3)
    assert result.bt["A"] == pytest.approx(1000 + gap / 2, abs=0.5)
    assert result.bt["B"] == pytest.approx(1000 - gap / 2, abs=0.5)


def _simulate(true: dict[str, float], n: int, seed: int) -> list[Battle]:
    rng = np.random.default_rng(seed)
    names = list(true)
    battles = []
    for _ in range(n):
        i, j = rng.choice(len(names), 2, replace=False)
        p = 1 / (1 + 10 ** ((true[names[j]] - true[names[i]]) / 400))
        battles.append(Battle(names[i], names[j], "model_a" if rng.random() < p else "model_b"))
    return battles


def test_bt_recovers_known_ratings():
    true = {"alpha": 1150.0, "beta": 1050.0, "gamma": 950.0, "delta": 850.0}  # mean 1000
    battles = _simulate(true, 4000, seed=1)
    result = rate(battles, bootstrap=100, seed=0)
    for m, r in true.items():
        assert abs(result.bt[m] - r) < 30, (m, result.bt[m], r)
        assert result.bt_ci_low[m] <= result.bt[m] <= result.bt_ci_high[m]
        assert 5 < result.bt_ci_high[m] - result.bt_ci_low[m] < 80
    assert result.ranking() == ["alpha", "beta", "gamma", "delta"]
    assert np.mean(list(result.bt.values())) == pytest.approx(1000.0, abs=1e-6)


def test_bt_newton_solution_is_a_stationary_point():
    rng = np.random.default_rng(3)
    w = rng.integers(0, 20, size=(5, 5)).astype(float)
    np.fill_diagonal(w, 0)
    theta = fit_bradley_terry(w, l2=0.0 + 1e-9)
    p = 1 / (1 + np.exp(-(theta[:, None] - theta[None, :])))
    grad = (w - (w + w.T) * p).sum(axis=1)
    assert np.abs(grad).max() < 1e-6


def test_bt_stays_finite_when_a_model_wins_everything():
    result = rate([Battle("A", "B", "model_a")] * 5 + [Battle("B", "C", "tie")], bootstrap=20)
    assert all(math.isfinite(v) for v in result.bt.values())
    assert result.bt["A"] > result.bt["B"]


def test_bootstrap_is_seeded_and_anchor_fixes_a_model():
    battles = _simulate({"x": 1100.0, "y": 1000.0, "z": 900.0}, 600, seed=2)
    r1 = rate(battles, bootstrap=50, seed=7, anchor="y", anchor_rating=1200.0)
    r2 = rate(battles, bootstrap=50, seed=7, anchor="y", anchor_rating=1200.0)
    assert r1.bt_ci_low == r2.bt_ci_low and r1.bt_ci_high == r2.bt_ci_high
    assert r1.bt["y"] == pytest.approx(1200.0)
    assert r1.elo["y"] == pytest.approx(1200.0)
    unanchored = rate(battles, bootstrap=0)
    assert r1.bt["x"] - r1.bt["z"] == pytest.approx(unanchored.bt["x"] - unanchored.bt["z"])


def test_win_counts_ties_are_half():
    w = win_counts([Battle("A", "B", "model_a"), Battle("B", "A", "tie")], ["A", "B"])
    assert w.tolist() == [[0, 1.5], [0.5, 0]]
    assert theta_to_rating(np.zeros(2)).tolist() == [1000.0, 1000.0]


def test_load_battles_json_list_and_jsonl(tmp_path):
    recs = [{"model_a": "a", "model_b": "b", "winner": "model_a", "extra": 1},
            {"model_a": "b", "model_b": "a", "winner": "tie (bothbad)"}]
    (tmp_path / "b.json").write_text(json.dumps(recs))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n\n")
    assert load_battles(tmp_path / "b.json") == load_battles(tmp_path / "b.jsonl")
    assert [b.winner for b in load_battles(tmp_path / "b.json")] == ["model_a", "tie (bothbad)"]


def test_load_battles_reports_every_problem(tmp_path):
    lines = [json.dumps({"model_a": "a", "model_b": "b", "winner": "model_a"}),
             json.dumps({"model_a": "a", "model_b": "b", "winner": "model_c"}),
             json.dumps({"model_a": "a", "winner": "tie"}),
             json.dumps({"model_a": "a", "model_b": "a", "winner": "tie"}),
             "[1, 2]"]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError) as e:
        load_battles(path)
    problems = e.value.problems
    assert any(f"{path}:2: field 'winner'" in p and "model_c" in p for p in problems)
    assert any(f"{path}:3: field 'model_b': missing" in p for p in problems)
    assert any(f"{path}:4: field 'model_b'" in p and "same model" in p for p in problems)
    assert any(f"{path}:5:" in p and "expected an object" in p for p in problems)


def _write_battles(path, battles):
    path.write_text("".join(json.dumps({"model_a": b.model_a, "model_b": b.model_b,
                                        "winner": b.winner}) + "\n" for b in battles))


def test_arena_cli_end_to_end(tmp_path, capsys):
    true = {"big": 1100.0, "mid": 1000.0, "small": 900.0}
    battles = _simulate(true, 900, seed=4) + [Battle("big", "small", "tie (bothbad)")]
    src = tmp_path / "battles.jsonl"
    _write_battles(src, battles)
    out = tmp_path / "arena"
    code = cli_main(["arena", "--battles", str(src), "--output", str(out), "--bootstrap", "30",
                     "--seed", "1"])
    assert code == 0
    rows = json.loads((out / "ratings.json").read_text())
    assert [r["model"] for r in rows] == ["big", "mid", "small"]
    assert set(rows[0]) == {"model", "elo", "bt", "bt_ci_low", "bt_ci_high", "battles"}
    assert sum(r["battles"] for r in rows) == 2 * len(battles)
    for r in rows:
        assert r["bt_ci_low"] <= r["bt"] <= r["bt_ci_high"]
    png = (out / "ratings.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "win_rates.png").exists() and (out / "config.yaml").exists()
    matrix = json.loads((out / "win_rates.json").read_text())
    assert matrix["models"] == ["big", "mid", "small"] and matrix["win_rate"][0][0] is None
    report = (out / "report.md").read_text()
    assert "| 1 | big |" in report and "Pairwise win rates" in report
    assert "big" in capsys.readouterr().out


def test_arena_cli_bad_file_exits_2_naming_record_and_field(tmp_path, capsys):
    src = tmp_path / "battles.json"
    src.write_text(json.dumps([{"model_a": "a", "model_b": "b", "winner": "model_a"},
                               {"model_a": "a", "model_b": "b", "winner": "draw"}]))
    code = cli_main(["arena", "--battles", str(src), "--output", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err
    assert f"error: {src}:2: field 'winner': 'draw' is not one of" in err
    assert "Traceback" not in err
    assert not (tmp_path / "o" / "ratings.json").exists()


def test_arena_cli_validates_flags(tmp_path, capsys):
    code = cli_main(["arena", "--battles", str(tmp_path / "missing.jsonl"), "--output",
                     str(tmp_path / "o"), "--bootstrap", "-1"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--battles: no such file" in err and "--bootstrap must be >= 0" in err


def test_arena_unknown_anchor(tmp_path, capsys):
    src = tmp_path / "b.jsonl"
    _write_battles(src, [Battle("a", "b", "model_a")])
    code = cli_main(["arena", "--battles", str(src), "--output", str(tmp_path / "o"),
                     "--anchor", "zzz", "--no-plot"])
    assert code == 2
    assert "--anchor: model 'zzz'" in capsys.readouterr().err
