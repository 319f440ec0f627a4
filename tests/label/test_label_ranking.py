"""Ranking tasks: import (3-4 completions, or 2 with --rank-pairs), the served order, storage by
completion index, the once-per-annotator guarantee, the export that `rlhfkit rm` reads, and the
upgrade of a version-1 database."""

from __future__ import annotations

import json
import threading

import pytest
from label_helpers import add_users, bearer, write_jsonl
from sqlalchemy import select, text

import rlhfkit
from rlhfkit.cli import main
from rlhfkit.data.schema import load_preferences, load_rankings
from rlhfkit.label import service
from rlhfkit.label.db import Database, Item, Meta, Ranking
from rlhfkit.label.importer import Pair, import_pairs
from rlhfkit.label.ranking import combined_ranking, parse_ranking, ranking_agreement, record_ranking
from rlhfkit.models import tiny

COMPLETIONS = ["best answer", "middle answer", "worst answer"]


def _labels_best_first(served, best_first: list[int]) -> list[str]:
    """The labels as shown of completion indices ``best_first``."""
    order = served.assignment.display_order
    return ["ABCD"[order.index(i)] for i in best_first]


def test_import_cli_makes_ranking_tasks_of_3_and_4_and_of_2_with_rank_pairs(tmp_path, capsys):
    data = tmp_path / "tasks.jsonl"
    write_jsonl(data, [{"prompt": "p3", "completions": ["a", "b", "c"]},
                       {"messages": [{"role": "user", "content": "p4"}], "completions": ["a", "b", "c", "d"]},
                       {"prompt": "p2", "completions": ["a", "b"]}])
    db = str(tmp_path / "labels.db")
    assert main(["label", "import", str(data), "--db", db]) == 0
    assert main(["label", "import", str(data), "--db", db, "--rank-pairs"]) == 0
    d = Database(db)
    with d.reading() as s:
        items = s.scalars(select(Item).order_by(Item.id)).all()
    d.dispose()
    # The second import adds only the 2-completion record, now as a ranking (a different task).
    assert [(i.completions, i.response_a, i.response_b) for i in items] == [
        (["a", "b", "c"], "a", "b"), (["a", "b", "c", "d"], "a", "b"), (None, "a", "b"), (["a", "b"], "a", "b")]
    bad = tmp_path / "bad.jsonl"
    write_jsonl(bad, [{"prompt": "p", "completions": ["a", "b", "c", "d", "e"]}])
    assert main(["label", "import", str(bad), "--db", db]) == 2
    assert "expected a list of 2 to 4 completions (2: a pair to compare, 3 or 4: a ranking task), got 5" \
        in capsys.readouterr().err


def test_ranking_is_served_shuffled_stored_by_index_and_exported(sqlite_db, client_for):
    import_pairs(sqlite_db, [Pair.ranking("Rank these.", COMPLETIONS)], overlap=2)
    (u1, t1), (u2, t2) = add_users(sqlite_db, 2)
    c = client_for(sqlite_db)
    served = c.get("/api/next", headers=bearer(t1)).json()
    assert served["kind"] == "ranking" and [r["label"] for r in served["responses"]] == ["A", "B", "C"]
    assert sorted(r["text"] for r in served["responses"]) == sorted(COMPLETIONS)
    shown = [r["text"] for r in served["responses"]]
    labels = ["ABC"[shown.index(t)] for t in COMPLETIONS]  # best first, as shown

    r = c.post("/api/rankings", headers=bearer(t1), json={"item_id": served["item_id"], "ranking": labels,
                                                          "flags": {labels[2]: ["fails_task"]}, "rating": "good"})
    assert r.status_code == 201 and r.json()["ranking_stored"] == [0, 1, 2]
    assert r.json()["flags"] == {"2": ["fails_task"]}  # by completion index, wherever it was shown
    again = c.post("/api/rankings", headers=bearer(t1), json={"item_id": served["item_id"], "ranking": labels,
                                                              "flags": {labels[2]: ["fails_task"]}, "rating": "good"})
    assert again.status_code == 200 and again.json()["duplicate"] is True
    other = c.post("/api/rankings", headers=bearer(t1), json={"item_id": served["item_id"],
                                                              "ranking": labels[::-1]})
    assert other.status_code == 409 and other.json()["judgment"]["ranking_stored"] == [0, 1, 2]
    # Annotator 2 swaps the top two.
    served2 = service.next_item(sqlite_db, u2)
    record_ranking(sqlite_db, u2, parse_ranking({"item_id": served2.item.id,
                                                 "ranking": _labels_best_first(served2, [1, 0, 2])}))

    [(_, admin)] = add_users(sqlite_db, 1, "admin", "boss")
    progress = c.get("/api/admin/stats", headers=bearer(admin)).json()["progress"]
    assert (progress["judgments"], progress["complete"], progress["not_started"]) == (2, 1, 0)
    assert c.get("/api/me", headers=bearer(t2)).json()["judgments"] == 1
    export = c.get("/api/admin/export", headers=bearer(admin))
    [row] = [json.loads(line) for line in export.text.splitlines()]
    # Mean positions: 0 -> 0.5, 1 -> 0.5, 2 -> 2: the tie goes to the lower index.
    assert row["ranking"] == [0, 1, 2] and row["completions"] == COMPLETIONS and row["prompt"] == "Rank these."
    assert row["rankings"] == [[0, 1, 2], [1, 0, 2]] and row["n_judgments"] == 2
    assert row["agreement"] == pytest.approx(5 / 6, abs=1e-4)  # 3 + 2 of the 6 pair orderings agree
    assert row["flags"] == {"0": {}, "1": {}, "2": {"fails_task": 1}}
    assert row["ratings"] == {"good": 1, "bad": 0}


def test_bad_rankings_are_refused(sqlite_db, client_for):
    import_pairs(sqlite_db, [Pair.ranking("Rank these.", COMPLETIONS), Pair("pair?", "x", "y")], overlap=1)
    [(_, token)] = add_users(sqlite_db, 1)
    c = client_for(sqlite_db)
    item_id = c.get("/api/next", headers=bearer(token)).json()["item_id"]
    for body, message in [({"item_id": item_id, "ranking": ["A", "B"]}, "give each of A, B, C once"),
                          ({"item_id": item_id, "ranking": ["A", "B", "D"]}, "give each of A, B, C once"),
                          ({"item_id": item_id, "ranking": ["A", "A", "B"]}, "each once"),
                          ({"item_id": item_id, "ranking": [0, 1, 2]}, "the labels as shown"),
                          ({"item_id": item_id, "ranking": ["A", "B", "C"], "flags": {"D": ["harmful"]}},
                           "this item shows only A, B, C")]:
        r = c.post("/api/rankings", headers=bearer(token), json=body)
        assert r.status_code == 422 and message in r.json()["detail"], (body, r.json())
    pair_judgment = c.post("/api/judgments", headers=bearer(token), json={"item_id": item_id, "likert": 1})
    assert pair_judgment.status_code == 409 and "send its judgment to /api/rankings" in pair_judgment.json()["detail"]
    with sqlite_db.reading() as s:
        assert s.scalars(select(Ranking)).all() == []


def test_a_ranking_sent_at_once_on_several_connections_is_stored_once(sqlite_db):
    import_pairs(sqlite_db, [Pair.ranking("Rank these.", COMPLETIONS)], overlap=1)
    [(uid, _)] = add_users(sqlite_db, 1)
    served = service.next_item(sqlite_db, uid)
    given = parse_ranking({"item_id": served.item.id, "ranking": _labels_best_first(served, [2, 0, 1])})
    statuses, gate = [], threading.Barrier(6)

    def send():
        gate.wait()
        statuses.append(record_ranking(sqlite_db, uid, given)[0])

    threads = [threading.Thread(target=send) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(statuses) == [200] * 5 + [201]
    with sqlite_db.reading() as s:
        [row] = s.scalars(select(Ranking)).all()
        assert row.ranking == [2, 0, 1] and s.get(Item, served.item.id).complete == 1


def test_combined_ranking_and_agreement_by_hand():
    # Positions: 0 -> (0+2+0)/3, 1 -> (1+0+2)/3, 2 -> (2+1+1)/3 = 0.67, 1.0, 1.33.
    rankings = [[0, 1, 2], [1, 2, 0], [0, 2, 1]]
    assert combined_ranking(rankings, 3) == [0, 1, 2]
    # Pairs 0>1, 0>2, 1>2: the first ranking agrees on 3, [1, 2, 0] on 1 (1>2), [0, 2, 1] on 2 (0>1, 0>2).
    assert ranking_agreement(rankings, [0, 1, 2]) == pytest.approx((3 + 1 + 2) / 9)


def test_a_version_1_database_is_upgraded_in_place(tmp_path):
    path = str(tmp_path / "old.db")
    d = Database(path)
    import_pairs(d, [Pair("old pair?", "x", "y")], overlap=1)
    with d.engine.begin() as conn:  # make it look like version 1
        conn.exec_driver_sql("DROP TABLE rankings")
        conn.exec_driver_sql("ALTER TABLE items DROP COLUMN completions")
        conn.exec_driver_sql("ALTER TABLE assignments DROP COLUMN display_order")
        conn.exec_driver_sql("ALTER TABLE judgments DROP COLUMN quality")
        conn.exec_driver_sql("UPDATE label_meta SET value = '1' WHERE key = 'schema_version'")
    d.dispose()
    d = Database(path)
    import_pairs(d, [Pair.ranking("new?", COMPLETIONS)], overlap=1)
    with d.reading() as s:
        assert [(i.prompt, i.is_ranking) for i in s.scalars(select(Item).order_by(Item.id))] == [
            ("old pair?", False), ("new?", True)]
        assert s.get(Meta, "schema_version").value == "3"
        assert s.execute(text("SELECT count(quality) FROM judgments")).scalar() == 0
        assert s.execute(text("SELECT count(*) FROM rankings")).scalar() == 0
    d.dispose()


def kind(name: str) -> str:
    return f"{name} is wonderful!"


@pytest.mark.slow
def test_ranking_export_trains_a_reward_model(tmp_path, capsys, one_thread):
    db_path = str(tmp_path / "labels.db")
    db = Database(db_path)
    names = ["Ada", "Bob", "Cy", "Di", "Ed", "Flo", "Gus", "Hal"]
    # Best to worst: wonderful, fine, awful; imported in a different order for each name.
    texts = [[kind(n), f"{n} is fine.", f"{n} is awful."] for n in names]
    perms = [[0, 1, 2], [2, 0, 1], [1, 2, 0], [2, 1, 0]]
    import_pairs(db, [Pair.ranking(f"Say something about {n}.", [t[i] for i in perms[k % 4]])
                      for k, (n, t) in enumerate(zip(names, texts))], overlap=1)
    [(uid, _)] = add_users(db, 1)
    while (served := service.next_item(db, uid)) is not None:
        comps = served.item.completions
        best_first = sorted(range(3), key=lambda i: 0 if "wonderful" in comps[i] else 1 if "fine" in comps[i] else 2)
        record_ranking(db, uid, parse_ranking({"item_id": served.item.id,
                                               "ranking": _labels_best_first(served, best_first)}))
    db.dispose()

    export = tmp_path / "rankings.jsonl"
    assert main(["label", "export", "--db", db_path, "--output", str(export)]) == 0
    assert "wrote 0 preference pairs and 8 rankings" in capsys.readouterr().out
    [ranked] = load_rankings(str(export))[:1]
    assert ranked.completions[ranked.ranking[0]].endswith("wonderful!")
    pairs = load_preferences(str(export))
    assert len(pairs) == 8 * 3  # K(K-1)/2 pairs per ranking
    out = tmp_path / "rm"
    code = main(["rm", "--model", tiny.make_tiny_reward_backbone(tmp_path / "tiny"), "--data", str(export),
                 "--output", str(out), "--max-steps", "20", "--batch-size", "12", "--lr", "1e-2", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    rm = rlhfkit.load_reward_model(str(out))
    prompts = [f"Say something about {n}." for n in names]
    best, mid, worst = (rm.score(prompts, [t[i] for t in texts]) for i in range(3))
    assert all(b > w for b, w in zip(best, worst)), list(zip(best, worst))
    assert sum(m > w for m, w in zip(mid, worst)) >= 6, list(zip(mid, worst))
