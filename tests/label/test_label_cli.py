"""`rlhfkit label add-user | import | export` through the real CLI entry point."""

from __future__ import annotations

import json
import sqlite3

import pytest
from label_helpers import write_jsonl
from sqlalchemy import select

from rlhfkit.cli import main
from rlhfkit.data.schema import load_preferences
from rlhfkit.label import service
from rlhfkit.label.db import Database, Item


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_add_user_prints_the_token_last(tmp_path, capsys):
    db = str(tmp_path / "labels.db")
    code, out, _ = run(capsys, "label", "add-user", "alice", "--db", db)
    assert code == 0
    token = out.strip().splitlines()[-1]
    assert len(token) >= 40 and " " not in token
    code, out, _ = run(capsys, "label", "add-user", "root", "--role", "admin", "--db", db)
    admin_token = out.strip().splitlines()[-1]
    d = Database(db)
    assert service.user_for_token(d, token).name == "alice"
    assert service.user_for_token(d, admin_token).role == "admin"
    # A second alice is refused (exit 2), unless a new token is asked for.
    code, _, err = run(capsys, "label", "add-user", "alice", "--db", db)
    assert code == 2 and "already exists" in err
    code, out, _ = run(capsys, "label", "add-user", "alice", "--db", db, "--new-token")
    assert code == 0 and service.user_for_token(d, out.strip().splitlines()[-1]).name == "alice"
    assert service.user_for_token(d, token) is None
    with pytest.raises(SystemExit) as e:  # argparse refuses an unknown role
        main(["label", "add-user", "bob", "--role", "boss", "--db", db])
    assert e.value.code == 2 and "invalid choice: 'boss'" in capsys.readouterr().err
    # The file is SQLite in WAL mode.
    assert sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_import_formats_metadata_and_dedup(tmp_path, capsys, db_url):
    data = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "Say hi", "response_a": "Hi!", "response_b": "Hello.", "model": "m1", "id": 7},
        {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                      {"role": "user", "content": "3+3?"}],
         "response_a": "6", "response_b": "Six."},
        # `rlhfkit generate --samples-per-prompt 2` output: prompt + completions (strings or objects)
        {"prompt": "Tell a joke", "completions": ["Knock knock.", "Why did the chicken..."], "seed": 3},
        {"messages": [{"role": "user", "content": "Count"}],
         "completions": [{"text": "1 2 3", "logprob": -1.5}, {"text": "one two", "logprob": -2.0}]},
        # a finished conversation, as `rlhfkit generate` accepts: the last reply is cut off
        {"messages": [{"role": "user", "content": "Greet"}, {"role": "assistant", "content": "Hi"}],
         "completions": ["Hello!", "Hey."], "scores": [0.1, 0.2], "best": "Hey."},
        {"prompt": "Same twice", "response_a": "x", "response_b": "x"},
    ])
    code, out, _ = run(capsys, "label", "import", str(data), "--db", db_url, "--overlap", "2",
                       "--extra-on-disagreement", "1")
    assert code == 0 and "imported 5 items" in out and "1 skipped: identical" in out
    code, out, _ = run(capsys, "label", "import", str(data), "--db", db_url)
    assert code == 0 and "imported 0 items" in out and "5 already present" in out
    d = Database(db_url)
    with d.reading() as s:
        items = list(s.scalars(select(Item).order_by(Item.id)))
    assert [i.prompt for i in items][0] == "Say hi"
    assert items[0].meta == {"model": "m1", "id": 7}
    assert items[1].prompt[-1] == {"role": "user", "content": "3+3?"}
    assert (items[2].response_a, items[2].response_b, items[2].meta) == \
        ("Knock knock.", "Why did the chicken...", {"seed": 3})
    assert items[3].response_b == "one two"
    assert items[3].meta == {"completions_meta": [{"logprob": -1.5}, {"logprob": -2.0}]}
    assert items[4].prompt == [{"role": "user", "content": "Greet"}]
    assert items[4].meta == {"reference_reply": "Hi", "scores": [0.1, 0.2], "best": "Hey."}
    assert all((i.overlap, i.target, i.extra_on_disagreement) == (2, 2, 1) for i in items)
    d.dispose()


def test_import_errors_name_file_line_and_field(tmp_path, capsys):
    db = str(tmp_path / "labels.db")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([
        json.dumps({"prompt": "ok", "response_a": "a", "response_b": "b"}),
        "{not json",
        json.dumps({"response_a": "a", "response_b": "b"}),
        json.dumps({"prompt": "p", "response_a": 3, "response_b": "b"}),
        json.dumps({"prompt": "p", "completions": ["only one"]}),
        json.dumps({"messages": [{"role": "assistant", "content": "a"}],
                    "response_a": "x", "response_b": "y"}),
        json.dumps(["a", "list"]),
        json.dumps({"prompt": "nul\u0000here", "response_a": "x", "response_b": "y"}),
    ]) + "\n")
    code, out, err = run(capsys, "label", "import", str(bad), "--db", db)
    assert code == 2
    lines = err.strip().splitlines()
    assert lines == [
        f"error: {bad}:2: invalid JSON: Expecting property name enclosed in double quotes",
        f"error: {bad}:3: needs 'prompt' (a string) or 'messages' (a list)",
        f"error: {bad}:4: field 'response_a': expected a string, got int",
        f"error: {bad}:5: field 'completions': expected a list of 2 to 4 completions "
        "(2: a pair to compare, 3 or 4: a ranking task), got 1",
        f"error: {bad}:6: field 'messages': holds only assistant turns: there is nothing to respond to",
        f"error: {bad}:7: expected a JSON object",
        f"error: {bad}:8: field 'prompt': contains a NUL (\\u0000) character, which databases "
        "such as PostgreSQL cannot store",
    ]
    # Nothing was imported, not even the good first line.
    d = Database(db)
    with d.reading() as s:
        assert s.scalars(select(Item)).first() is None
    d.dispose()
    code, _, err = run(capsys, "label", "import", str(tmp_path / "missing.jsonl"), "--db", db)
    assert code == 2 and "no such file" in err
    code, _, err = run(capsys, "label", "import", str(bad), "--db", db, "--overlap", "0")
    assert code == 2 and "--overlap must be >= 1" in err
    code, _, err = run(capsys, "label", "import", str(bad), "--db", str(tmp_path / "nope" / "x.db"))
    assert code == 2 and "does not exist" in err


class Left:
    def __init__(self, side):
        self.side = side

    def choice(self, _):
        return self.side


def _judge(db, uid, item_id, likert, left="response_a", rating=None, flags=None):
    served = service.next_item(db, uid, rng=Left(left))
    assert served.item.id == item_id
    body = {"item_id": item_id, "likert": likert, "rating": rating}
    if flags:
        body["flags"] = flags
    status, _ = service.record_judgment(db, uid, service.parse_judgment(body))
    assert status == 201


def test_export_aggregation_rule(tmp_path, capsys, db_url):
    """Majority direction; margin = mean Likert margin (rlhfkit.data.likert: 0, 1/3, 2/3, 1) on the
    majority side; ties dropped or kept."""
    data = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "p1", "response_a": "a1", "response_b": "b1", "tag": "one"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey"},
                      {"role": "user", "content": "p2"}], "response_a": "a2", "response_b": "b2"},
        {"prompt": "p3", "response_a": "a3", "response_b": "b3"},
        {"prompt": "p4 (never judged)", "response_a": "a4", "response_b": "b4"},
    ])
    assert run(capsys, "label", "import", str(data), "--db", db_url, "--overlap", "3")[0] == 0
    d = Database(db_url)
    uids = [service.add_user(d, f"u{i}")[0].id for i in range(3)]
    # item 1: stored likerts 1, 3 (A) and 7 (B): majority A, margin mean(1, 1/3) = 2/3, agreement 2/3.
    # Annotator 2 saw B on the left: shown 8 ("B much better") means response_a -> stored 1.
    _judge(d, uids[0], 1, 3, flags={"A": ["hallucination"]})
    _judge(d, uids[1], 1, 8, left="response_b", rating="good")
    _judge(d, uids[2], 1, 7, flags={"B": ["harmful"], "A": ["hallucination"]})
    # item 2: B by two (7 -> margin 2/3, 8 -> 1): margin 5/6; shown on the left as B once.
    _judge(d, uids[0], 2, 7)
    _judge(d, uids[1], 2, 1, left="response_b")
    # item 3: split 1 vs 1 -> a tie.
    _judge(d, uids[0], 3, 4)
    _judge(d, uids[1], 3, 5)
    d.dispose()

    out = tmp_path / "pairs_out.jsonl"
    code, stdout, _ = run(capsys, "label", "export", "--db", db_url, "--output", str(out))
    assert code == 0 and "wrote 2 preference pairs" in stdout and "1 evenly split items dropped" in stdout
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 2
    r1, r2 = rows
    assert (r1["prompt"], r1["chosen"], r1["rejected"]) == ("p1", "a1", "b1")
    assert r1["margin"] == 0.6667 and r1["n_judgments"] == 3 and r1["agreement"] == pytest.approx(0.6667)
    assert r1["annotator_ids"] == sorted(uids) and r1["tie"] is False
    assert r1["likerts"] == [3, 1, 7] and r1["votes"] == {"response_a": 2, "response_b": 1}
    assert r1["flags"] == {"chosen": {"hallucination": 2}, "rejected": {"harmful": 1}}
    assert r1["ratings"] == {"good": 1, "bad": 0} and r1["metadata"] == {"tag": "one"}
    # Left won only for annotator 0 (response_a on the left, shown 3); annotator 1 had
    # response_b on the left and chose the right one; annotator 2 chose the right one.
    assert r1["left_wins"] == 1
    assert r2["prompt"][-1] == {"role": "user", "content": "p2"} and isinstance(r2["prompt"], list)
    assert (r2["chosen"], r2["rejected"], r2["margin"], r2["agreement"]) == ("b2", "a2", 0.8333, 1.0)

    code, stdout, _ = run(capsys, "label", "export", "--db", db_url, "--output", str(out), "--keep-ties")
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 3 and "1 ties kept" in stdout
    tie = rows[2]
    assert tie["tie"] is True and tie["margin"] == 0.0 and tie["agreement"] == 0.5
    assert (tie["chosen"], tie["rejected"]) == ("a3", "b3")

    # The export reads back as preference data with the project's own loader; kept ties carry
    # no preferred side, so the loader skips them (2 of the 3 rows train rm/dpo).
    pairs = load_preferences(str(out))
    assert len(pairs) == 2 and pairs[0].margin == 0.6667
    assert all(p.source.data.get("tie") is False for p in pairs)


def test_export_validation(tmp_path, capsys):
    code, _, err = run(capsys, "label", "export", "--db", str(tmp_path / "none.db"),
                       "--output", str(tmp_path / "o.jsonl"))
    assert code == 2 and "no such database file" in err
    code, _, err = run(capsys, "label", "export", "--db", str(tmp_path / "none.db"))
    assert code == 2 and "--output is required" in err


def test_storable_text_makes_model_output_with_nul_importable(tmp_path):
    """Files rlhfkit writes from model output for people (the loop's to_label.jsonl) replace NUL by
    U+FFFD, which the importer accepts."""
    from rlhfkit.label.importer import read_pairs, storable_text

    assert storable_text("a\u0000b\u0000") == "a\ufffdb\ufffd" and storable_text("plain") == "plain"
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "p", "response_a": storable_text("x\u0000"), "response_b": "y"}) + "\n")
    assert read_pairs(path)[0].response_a == "x\ufffd"
