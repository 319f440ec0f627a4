"""Live tasks against a scripted OpenAI-compatible endpoint: two replies per user turn, one pairwise
judgment per turn (the conversation so far as the prompt, with the models' names), the preferred reply
continuing the conversation, and the failures (no models, a failing model, identical replies)."""

from __future__ import annotations

import json

import pytest
from label_helpers import add_users, bearer
from sqlalchemy import select

from rlhfkit.cli import main
from rlhfkit.label.db import Item, Judgment
from rlhfkit.label.live import LiveModels
from scripted_endpoint import ScriptedEndpoint


def by_model(body: dict) -> str:
    """Each model answers differently: its name and the last user turn."""
    return f"{body['model']} says hi to: {body['messages'][-1]['content']}"


def _judge_for(c, token: str, served: dict, wanted_text: str) -> dict:
    """Prefer ``wanted_text`` "much" wherever it was shown."""
    left = served["responses"][0]["text"]
    r = c.post("/api/judgments", headers=bearer(token),
               json={"item_id": served["item_id"], "likert": 1 if left == wanted_text else 8, "rating": "good"})
    assert r.status_code == 201, r.text
    return r.json()


def test_two_models_each_turn_is_one_judgment_and_the_choice_continues(sqlite_db, client_for, tmp_path):
    (_, token), (_, other) = add_users(sqlite_db, 2)
    with ScriptedEndpoint(by_model) as ep:
        models = LiveModels.from_flags([ep.url, ep.url], ["alpha", "beta"], "sk-live-secret", 0.0, 32)
        c = client_for(sqlite_db, live_models=models)
        first = c.post("/api/live/turn", headers=bearer(token), json={"user": "Hello"})
        assert first.status_code == 201, first.text
        served = first.json()
        assert served["conversation"] == [{"role": "user", "content": "Hello"}]
        assert served["live"] == {"conversation": served["item_id"], "turn": 1}
        assert {r["text"] for r in served["responses"]} == {"alpha says hi to: Hello", "beta says hi to: Hello"}
        assert "model_a" not in json.dumps(served)  # blind until the vote
        # Nobody else is ever served a live turn.
        assert c.get("/api/next", headers=bearer(other)).status_code == 204
        _judge_for(c, token, served, "beta says hi to: Hello")

        second = c.post("/api/live/turn", headers=bearer(token),
                        json={"user": "And again", "after_item": served["item_id"]}).json()
        conversation = [{"role": "user", "content": "Hello"},
                        {"role": "assistant", "content": "beta says hi to: Hello"},  # the preferred reply
                        {"role": "user", "content": "And again"}]
        assert second["conversation"] == conversation
        assert second["live"] == {"conversation": served["item_id"], "turn": 2}
        assert ep.seen[-1]["messages"] == conversation  # what the models saw is what is stored
        _judge_for(c, token, second, "alpha says hi to: And again")
        assert {h.get("Authorization") or h.get("authorization") for h in ep.headers} == {"Bearer sk-live-secret"}

    with sqlite_db.reading() as s:
        items = s.scalars(select(Item).order_by(Item.id)).all()
        judgments = s.scalars(select(Judgment).order_by(Judgment.id)).all()
    assert [(i.prompt, i.meta["model_a"], i.meta["model_b"], i.meta["live"]["turn"]) for i in items] == [
        ([{"role": "user", "content": "Hello"}], "alpha", "beta", 1), (conversation, "alpha", "beta", 2)]
    assert [items[k].meta[f"model_{j.preferred[-1]}"] for k, j in enumerate(judgments)] == ["beta", "alpha"]
    assert b"sk-live-secret" not in (tmp_path / "labels.db").read_bytes()  # the key is never stored

    export = tmp_path / "pairs.jsonl"
    assert main(["label", "export", "--db", str(tmp_path / "labels.db"), "--output", str(export)]) == 0
    rows = [json.loads(line) for line in export.read_text().splitlines()]
    hello = [{"role": "user", "content": "Hello"}]
    assert [(r["prompt"], r["chosen"]) for r in rows] == [(hello, "beta says hi to: Hello"),
                                                          (conversation, "alpha says hi to: And again")]


def test_live_failures_are_readable(sqlite_db, client_for):
    (_, token), (_, other) = add_users(sqlite_db, 2)
    assert client_for(sqlite_db).post("/api/live/turn", headers=bearer(token), json={"user": "hi"}).status_code == 503
    with ScriptedEndpoint(lambda body: "always the same") as same, \
            ScriptedEndpoint(lambda body: (400, {"error": {"message": "no such model"}})) as broken:
        c = client_for(sqlite_db, live_models=LiveModels.from_flags([same.url], ["solo"], None, 0.8, 16))
        r = c.post("/api/live/turn", headers=bearer(token), json={"user": "hi"})
        assert r.status_code == 502 and "identical" in r.json()["detail"] and len(same.seen) == 2 * 3
        c = client_for(sqlite_db, live_models=LiveModels.from_flags([broken.url], ["nope"], None, 0.8, 16))
        r = c.post("/api/live/turn", headers=bearer(token), json={"user": "hi"})
        assert r.status_code == 502 and "no such model" in r.json()["detail"]
        for body, status, message in [({"user": ""}, 422, "user: required"), ({"user": "x", "after_item": "1"}, 422,
                                                                              "after_item: an integer"),
                                      ({"user": "x", "after_item": 999}, 409, "not a live turn you have judged")]:
            r = c.post("/api/live/turn", headers=bearer(other), json=body)
            assert r.status_code == status and message in r.json()["detail"], r.json()
    with sqlite_db.reading() as s:
        assert s.scalars(select(Item)).all() == []  # nothing stored for a turn without two replies


def test_one_model_gives_two_samples_and_no_battles(sqlite_db, client_for):
    [(_, token)] = add_users(sqlite_db, 1)
    calls = iter(range(100))
    with ScriptedEndpoint(lambda body: f"sample {next(calls)}") as ep:
        c = client_for(sqlite_db, live_models=LiveModels.from_flags([ep.url], ["solo"], None, 0.8, 16))
        served = c.post("/api/live/turn", headers=bearer(token), json={"user": "hi"}).json()
        assert sorted(r["text"] for r in served["responses"]) == ["sample 0", "sample 1"]
        assert [b["temperature"] for b in ep.seen] == [0.8, 0.8]
    with sqlite_db.reading() as s:
        assert s.get(Item, served["item_id"]).meta["model_a"] == "solo"


@pytest.mark.parametrize("flags, problem", [
    (["--live-url", "http://x/v1"], "--live-url and --live-model go together, once or twice (got 1 --live-url, "
                                    "0 --live-model)"),
    (["--live-url", "a", "--live-model", "m"] * 3, "once or twice (got 3 --live-url, 3 --live-model)"),
])
def test_serve_live_flags_are_checked(flags, problem, tmp_path, capsys):
    assert main(["label", "serve", "--db", str(tmp_path / "x.db"), *flags]) == 2
    assert problem in capsys.readouterr().err
