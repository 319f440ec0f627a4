"""Export -> `rlhfkit rm`: the judgments become reward-model training data with no conversion, and a
reward model trained on them prefers what the annotators preferred."""

from __future__ import annotations

import json

import pytest
from label_helpers import add_users, import_pairs

import rlhfkit
from rlhfkit.cli import main
from rlhfkit.label import service
from rlhfkit.label.db import Database
from rlhfkit.label.importer import Pair
from rlhfkit.models import tiny

NAMES = ["Ada", "Bob", "Cy", "Di", "Ed", "Flo", "Gus", "Hal", "Ivy", "Jo", "Kim", "Lu"]
HELD_OUT = ["Max", "Ned", "Oz", "Pam", "Quin", "Ray", "Sam", "Tess"]


def kind(name: str) -> str:
    return f"{name} is wonderful!"


def unkind(name: str) -> str:
    return f"{name} is awful."


@pytest.mark.slow
def test_export_trains_a_reward_model_that_prefers_the_preferred(tmp_path, capsys, one_thread):
    db_path = str(tmp_path / "labels.db")
    db = Database(db_path)
    # The kind answer is stored as response_a for half of the items and as response_b for the
    # other half, so only an export that follows the judgments gets every direction right.
    pairs = [Pair(prompt=f"Say something about {n}.",
                  response_a=kind(n) if i % 2 == 0 else unkind(n),
                  response_b=unkind(n) if i % 2 == 0 else kind(n)) for i, n in enumerate(NAMES)]
    pairs.append(Pair(prompt=[{"role": "user", "content": "Hi"},
                              {"role": "assistant", "content": "Hello! How can I help?"},
                              {"role": "user", "content": "Say something about me."}],
                      response_a=unkind("You"), response_b=kind("You")))
    import_pairs(db, pairs, overlap=2)
    for uid, _ in add_users(db, 2):
        while (served := service.next_item(db, uid)) is not None:
            # Both annotators prefer the kind answer "much" (1 = left, 8 = right), wherever it was shown.
            left = served.item.text(served.assignment.left_side)
            service.record_judgment(db, uid, service.parse_judgment(
                {"item_id": served.item.id, "likert": 1 if left.endswith("wonderful!") else 8}))
    db.dispose()

    export = tmp_path / "pairs.jsonl"
    assert main(["label", "export", "--db", db_path, "--output", str(export)]) == 0
    rows = [json.loads(line) for line in export.read_text().splitlines()]
    assert len(rows) == len(pairs) and isinstance(rows[-1]["prompt"], list)
    assert all(r["margin"] == 1.0 and r["agreement"] == 1.0 for r in rows)  # "much better": margin 1
    assert all(r["chosen"].endswith("wonderful!") and r["rejected"].endswith("awful.") for r in rows)

    out = tmp_path / "rm"
    code = main(["rm", "--model", tiny.make_tiny_reward_backbone(tmp_path / "tiny"), "--data", str(export),
                 "--output", str(out), "--max-steps", "20", "--batch-size", "13", "--lr", "1e-2",
                 "--no-progress"])
    assert code == 0, capsys.readouterr().err

    rm = rlhfkit.load_reward_model(str(out))
    prompts = [r["prompt"] for r in rows]
    chosen, rejected = rm.score(prompts, [r["chosen"] for r in rows]), rm.score(prompts, [r["rejected"] for r in rows])
    assert all(c > r for c, r in zip(chosen, rejected)), list(zip(chosen, rejected))
    # Names it never saw: the kind answer still scores higher.
    prompts = [f"Say something about {n}." for n in HELD_OUT]
    chosen, rejected = rm.score(prompts, [kind(n) for n in HELD_OUT]), rm.score(prompts, [unkind(n) for n in HELD_OUT])
    assert all(c > r for c, r in zip(chosen, rejected)), list(zip(chosen, rejected))
