"""Export -> `rlhfkit rm`: the judgments become reward-model training data with no conversion."""

from __future__ import annotations

import json

import pytest
from label_helpers import add_users, import_pairs

from rlhfkit.cli import main
from rlhfkit.label import service
from rlhfkit.label.db import Database
from rlhfkit.label.importer import Pair


@pytest.mark.slow
def test_export_trains_a_reward_model(tmp_path, capsys):
    pytest.importorskip("rlhfkit.recipes.rm", reason="`rlhfkit rm` is not available yet")
    from rlhfkit.models import tiny

    db_path = str(tmp_path / "labels.db")
    db = Database(db_path)
    pairs = [Pair(prompt=f"Say something kind about {i}.", response_a=f"{i} is wonderful!",
                  response_b=f"{i} is awful.") for i in range(4)]
    pairs.append(Pair(prompt=[{"role": "user", "content": "Hi"},
                              {"role": "assistant", "content": "Hello! How can I help?"},
                              {"role": "user", "content": "Compliment me."}],
                      response_a="You are great.", response_b="No."))
    import_pairs(db, pairs, overlap=2)
    for uid, _ in add_users(db, 2):
        while (served := service.next_item(db, uid)) is not None:
            # Both annotators prefer the kind answer (response_a), wherever it was shown.
            likert = 1 if served.assignment.left_side == "response_a" else 8
            service.record_judgment(db, uid, service.parse_judgment(
                {"item_id": served.item.id, "likert": likert}))
    db.dispose()

    export = tmp_path / "pairs.jsonl"
    assert main(["label", "export", "--db", db_path, "--output", str(export)]) == 0
    rows = [json.loads(line) for line in export.read_text().splitlines()]
    assert len(rows) == 5 and all(r["margin"] == 3.0 and r["agreement"] == 1.0 for r in rows)
    assert isinstance(rows[-1]["prompt"], list)

    model_dir = tmp_path / "tiny"
    tiny.make_tiny_reward_backbone(model_dir)
    out = tmp_path / "rm"
    code = main(["rm", "--model", str(model_dir), "--data", str(export), "--output", str(out),
                 "--max-steps", "2", "--batch-size", "2"])
    assert code == 0, capsys.readouterr().err
    assert (out / "metrics.jsonl").exists()
    assert (out / "config.yaml").exists()
