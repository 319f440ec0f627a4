"""Human votes -> `rlhfkit arena` battles and per-model win rates; curation of the export
(--exclude-flag, --min-agreement, --min-judgments, --quadrant) on hand-made judgments."""

from __future__ import annotations

import json

from label_helpers import add_users, bearer

from rlhfkit.cli import main
from rlhfkit.label import service
from rlhfkit.label.battles import win_rates
from rlhfkit.label.db import Database
from rlhfkit.label.importer import Pair, import_pairs


def _judge_all(db: Database, uid: int, decide) -> None:
    """``decide(item, left_text) -> (likert as shown, flags {"A": [...], "B": [...]})`` for every item."""
    while (served := service.next_item(db, uid)) is not None:
        likert, flags = decide(served.item, served.item.text(served.assignment.left_side))
        service.record_judgment(db, uid, service.parse_judgment(
            {"item_id": served.item.id, "likert": likert, "flags": flags}))


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_battles_export_is_read_by_arena_and_win_rates_on_the_stats_page(tmp_path, capsys, client_for):
    db_path = str(tmp_path / "labels.db")
    db = Database(db_path)
    # Three models; "big" always wins, "mid" beats "small". One pair names no models, one the same model twice.
    pairs = [Pair(f"q{i}?", f"{a} answer {i}", f"{b} answer {i}", metadata={"model_a": a, "model_b": b})
             for i, (a, b) in enumerate([("big", "small"), ("small", "big"), ("mid", "small"), ("big", "mid")])]
    pairs += [Pair("no models?", "x", "y"), Pair("same?", "x1", "y1", metadata={"model_a": "big", "model_b": "big"})]
    import_pairs(db, pairs, overlap=2)
    rank = {"big": 0, "mid": 1, "small": 2}

    def better(item, left):
        a, b = item.meta.get("model_a", "big"), item.meta.get("model_b", "big")
        winner_text = item.response_a if rank[a] <= rank[b] else item.response_b
        return (2 if left == winner_text else 7), {"A": [], "B": []}

    for uid, _ in add_users(db, 2):
        _judge_all(db, uid, better)
    [(_, admin)] = add_users(db, 1, "admin", "boss")

    out = tmp_path / "battles.jsonl"
    assert main(["label", "export", "--db", db_path, "--format", "battles", "--output", str(out)]) == 0
    assert "wrote 8 battles" in capsys.readouterr().out
    battles = _rows(out)
    assert [(b["model_a"], b["model_b"], b["winner"]) for b in battles[:2]] == [("big", "small", "model_a"),
                                                                                ("small", "big", "model_b")]
    winners = [b[b["winner"]] for b in battles]
    assert winners.count("big") == 6 and winners.count("mid") == 2 and "small" not in winners
    # The same figures on the stats page (JSON and HTML).
    c = client_for(db)
    models = c.get("/api/admin/stats", headers=bearer(admin)).json()["models"]
    assert models == [{"model": "big", "battles": 6, "wins": 6, "win_rate": 1.0},
                      {"model": "mid", "battles": 4, "wins": 2, "win_rate": 0.5},
                      {"model": "small", "battles": 6, "wins": 0, "win_rate": 0.0}]
    c.get("/", params={"token": admin})
    assert "Models: human win rates" in c.get("/admin").text
    assert c.get("/api/admin/export?format=battles", headers=bearer(admin)).text == out.read_text()
    db.dispose()

    ratings_dir = tmp_path / "arena"
    assert main(["arena", "--battles", str(out), "--output", str(ratings_dir), "--bootstrap", "0"]) == 0
    ratings = json.loads((ratings_dir / "ratings.json").read_text())
    assert [r["model"] for r in ratings] == ["big", "mid", "small"]
    assert {r["model"]: r["battles"] for r in ratings} == {"big": 6, "mid": 4, "small": 6}


def test_win_rates_by_hand():
    battles = [{"model_a": "x", "model_b": "y", "winner": "model_a"},
               {"model_a": "y", "model_b": "x", "winner": "model_a"},
               {"model_a": "x", "model_b": "z", "winner": "model_a"}]
    assert win_rates(battles) == [{"model": "x", "battles": 3, "wins": 2, "win_rate": 2 / 3},
                                  {"model": "y", "battles": 2, "wins": 1, "win_rate": 0.5},
                                  {"model": "z", "battles": 1, "wins": 0, "win_rate": 0.0}]


def test_curation_exclude_flag_min_agreement_min_judgments(tmp_path, capsys):
    db_path = str(tmp_path / "labels.db")
    db = Database(db_path)
    # q0: 3 agree; q1: 2 of 3 (agreement 0.6667); q2: one judgment only (item wants 1); q3: flagged once.
    import_pairs(db, [Pair(f"q{i}?", f"good {i}", f"bad {i}", metadata={"model_a": "g", "model_b": "b"})
                      for i in (0, 1, 3)], overlap=3)
    import_pairs(db, [Pair("q2?", "good 2", "bad 2")], overlap=1)
    users = add_users(db, 3)
    for k, (uid, _) in enumerate(users):
        def decide(item, left, k=k):
            prefers_good = not (item.prompt == "q1?" and k == 2)
            good_left = left.startswith("good")
            flags = {"A": [], "B": []}
            if item.prompt == "q3?" and k == 0:
                flags["A" if not good_left else "B"] = ["hallucination"]  # the bad answer
            return (1 if good_left == prefers_good else 8), flags
        _judge_all(db, uid, decide)
    db.dispose()

    def export(*flags: str, fmt: str = "pairs") -> list[dict]:
        out = tmp_path / "out.jsonl"
        assert main(["label", "export", "--db", db_path, "--output", str(out), "--format", fmt, *flags]) == 0
        return _rows(out)

    assert [r["prompt"] for r in export()] == ["q0?", "q1?", "q3?", "q2?"]
    assert [r["prompt"] for r in export("--exclude-flag", "hallucination")] == ["q0?", "q1?", "q2?"]
    assert "1 dropped by curation" in capsys.readouterr().out
    assert [r["prompt"] for r in export("--min-agreement", "0.7")] == ["q0?", "q3?", "q2?"]  # q2: judged once
    assert [r["prompt"] for r in export("--min-agreement", "0.6")] == ["q0?", "q1?", "q3?", "q2?"]
    assert [r["prompt"] for r in export("--min-judgments", "2", "--min-agreement", "1")] == ["q0?", "q3?"]
    # Battles: the flagged judgment is dropped, the other two of q3 stay.
    assert len(export(fmt="battles")) == 9 and len(export("--exclude-flag", "hallucination", fmt="battles")) == 8
    assert main(["label", "export", "--db", db_path, "--output", str(tmp_path / "x"), "--exclude-flag", "typo",
                 "--min-agreement", "2"]) == 2
    err = capsys.readouterr().err
    assert "--exclude-flag 'typo': not a flag (known: hallucination," in err
    assert "--min-agreement must be in [0, 1] (got 2.0)" in err


def test_quality_is_stored_by_response_and_gives_the_quadrant(tmp_path, capsys, client_for):
    db_path = str(tmp_path / "labels.db")
    db = Database(db_path)
    # Each prompt names the quality of its answers: "gg" both good, "gb" the kind one good and the other bad...
    import_pairs(db, [Pair("api?", "one", "two")], overlap=1)
    import_pairs(db, [Pair(f"{q}?", f"kind {q}", f"rude {q}") for q in ("gg", "gb", "bb", "bg", "split")],
                 overlap=2)
    (u1, t1), (u2, _) = add_users(db, 2)
    c = client_for(db)
    served = c.get("/api/next", headers=bearer(t1)).json()
    assert c.post("/api/judgments", headers=bearer(t1), json={"item_id": served["item_id"], "likert": 3,
                                                              "quality": {"A": "maybe"}}).status_code == 422
    body = {"item_id": served["item_id"], "likert": 3, "quality": {"A": "good", "B": "bad"}}
    stored = c.post("/api/judgments", headers=bearer(t1), json=body).json()
    assert stored["quality"] == {"A": "good", "B": "bad"}
    assert stored["quality_stored"] == {stored["left_is"]: "good",
                                        "response_b" if stored["left_is"] == "response_a" else "response_a": "bad"}
    assert c.post("/api/judgments", headers=bearer(t1), json=body).status_code == 200
    other = {**body, "quality": {"A": "good"}}
    assert c.post("/api/judgments", headers=bearer(t1), json=other).status_code == 409

    def decide(item, left, k):
        """Prefer the kind answer; rate each answer by the prompt's letters (kind first); "split": the
        two annotators rate both answers opposite ways."""
        q = item.prompt[:-1]
        kind_q, rude_q = ("good", "bad") if q == "split" and k == 0 else ("bad", "good") if q == "split" else (
            {"g": "good", "b": "bad"}[q[0]], {"g": "good", "b": "bad"}[q[1]])
        kind_left = left.startswith("kind")
        return (1 if kind_left else 8), {"A": kind_q if kind_left else rude_q, "B": rude_q if kind_left else kind_q}

    for k, uid in enumerate([u1, u2]):
        while (served := service.next_item(db, uid)) is not None:
            likert, quality = decide(served.item, served.item.text(served.assignment.left_side), k)
            service.record_judgment(db, uid, service.parse_judgment(
                {"item_id": served.item.id, "likert": likert, "quality": quality}))
    db.dispose()

    def export(*flags: str) -> list[dict]:
        out = tmp_path / "out.jsonl"
        assert main(["label", "export", "--db", db_path, "--output", str(out), *flags]) == 0
        return _rows(out)

    rows = {r["prompt"]: r for r in export()}
    # api?: one judgment, the left answer (A, rated good) slightly better: chosen good, rejected bad.
    assert {p: r["quadrant"] for p, r in rows.items()} == {
        "api?": "good-vs-bad", "gg?": "good-vs-good", "gb?": "good-vs-bad", "bb?": "bad-vs-bad", "bg?": "bad-vs-good",
        "split?": None}
    assert rows["split?"]["quality"] == {"chosen": {"good": 1, "bad": 1}, "rejected": {"good": 1, "bad": 1}}
    assert [r["prompt"] for r in export("--quadrant", "good-vs-bad")] == ["api?", "gb?"]
    assert [r["prompt"] for r in export("--quadrant", "good-vs-good", "--quadrant", "bad-vs-bad")] == ["gg?", "bb?"]
    assert main(["label", "export", "--db", db_path, "--output", str(tmp_path / "x"), "--quadrant", "ok"]) == 2
    assert "--quadrant" in capsys.readouterr().err
