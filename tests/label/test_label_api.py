"""The JSON API and pages through FastAPI's TestClient, on SQLite and on PostgreSQL."""

from __future__ import annotations

import hashlib

import pytest
from label_helpers import add_users, bearer, import_pairs, make_pairs
from sqlalchemy import func, select

from rlhfkit.label import service
from rlhfkit.label.db import Item, Judgment, User
from rlhfkit.label.importer import Pair


class FixedSide:
    """An rng whose choice of left side is fixed."""

    def __init__(self, side):
        self.side = side

    def choice(self, _seq):
        return self.side


def judgments_in(db) -> list[Judgment]:
    with db.reading() as s:
        return list(s.scalars(select(Judgment).order_by(Judgment.id)))


# --------------------------------------------------------------------------------------------
# Authentication
# --------------------------------------------------------------------------------------------


def test_auth_bearer_cookie_and_401(db, client_for):
    import_pairs(db, make_pairs(2), overlap=1)
    [(uid, token)] = add_users(db, 1)
    c = client_for(db)
    for path in ("/api/next", "/api/me", "/api/judgments"):
        r = c.get(path)
        assert r.status_code == 401, path
        assert r.headers["www-authenticate"] == "Bearer"
        assert "Bearer" in r.json()["detail"]
    assert c.get("/api/me", headers=bearer("wrong-token")).status_code == 401
    assert c.get("/api/me", headers={"Authorization": "Basic abc"}).status_code == 401
    assert c.post("/api/judgments", json={"item_id": 1, "likert": 1}).status_code == 401
    assert c.get("/api/me", headers=bearer(token)).json()["name"] == "ann0"

    # The sign-in link: a wrong token is refused, a right one sets a cookie session and
    # redirects to "/" (so the token leaves the address bar).
    assert c.get("/", params={"token": "nope"}).status_code == 401
    assert c.get("/").status_code == 401  # no session yet: the sign-in help page
    r = c.get("/", params={"token": token}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/"
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "samesite=lax" in cookie.lower()
    assert c.get("/api/me").json()["id"] == uid  # the cookie now authenticates the API
    assert c.get("/").status_code == 200
    # A wrong bearer header is decisive even next to a valid cookie.
    assert c.get("/api/me", headers=bearer("wrong")).status_code == 401
    c.get("/logout")
    assert c.get("/api/me").status_code == 401


def test_tokens_and_sessions_stored_hashed(db, client_for):
    [(uid, token)] = add_users(db, 1)
    c = client_for(db)
    c.get("/", params={"token": token}, follow_redirects=False)
    session_value = c.cookies.get("rlhfkit_label_session")
    assert session_value
    with db.reading() as s:
        user = s.get(User, uid)
        assert user.token_hash == hashlib.sha256(token.encode()).hexdigest()
        from rlhfkit.label.db import WebSession
        stored = [w.session_hash for w in s.scalars(select(WebSession))]
    assert stored == [hashlib.sha256(session_value.encode()).hexdigest()]
    # Neither secret appears anywhere in the database file.
    if db.engine.dialect.name == "sqlite":
        db.dispose()
        raw = open(db.engine.url.database, "rb").read()
        assert token.encode() not in raw and session_value.encode() not in raw


def test_new_token_replaces_old(db, client_for):
    [(_uid, old)] = add_users(db, 1)
    c = client_for(db)
    with pytest.raises(service.LabelError):
        service.add_user(db, "ann0")
    _user, new, created = service.add_user(db, "ann0", new_token_if_exists=True)
    assert not created
    assert c.get("/api/me", headers=bearer(old)).status_code == 401
    assert c.get("/api/me", headers=bearer(new)).status_code == 200


# --------------------------------------------------------------------------------------------
# The queue and judgments
# --------------------------------------------------------------------------------------------


def test_next_judge_and_stored_orientation(db, client_for):
    """Judging through the API records the display order and undoes it for the stored side."""
    import_pairs(db, make_pairs(40), overlap=1)
    users = add_users(db, 1)
    c = client_for(db)
    h = bearer(users[0][1])
    seen_sides = set()
    for k in range(40):
        r = c.get("/api/next", headers=h)
        assert r.status_code == 200
        nxt = r.json()
        # A reload returns the same item with the same sides.
        assert c.get("/api/next", headers=h).json()["responses"] == nxt["responses"]
        with db.reading() as s:
            item = s.get(Item, nxt["item_id"])
        left, right = nxt["responses"]
        assert (left["label"], left["position"], right["label"], right["position"]) == \
            ("A", "left", "B", "right")
        assert left["text"] == item.text(nxt["left_is"]) and right["text"] == item.text(nxt["right_is"])
        assert {nxt["left_is"], nxt["right_is"]} == {"response_a", "response_b"}
        assert nxt["conversation"] == [{"role": "user", "content": item.prompt}]
        seen_sides.add(nxt["left_is"])
        likert = k % 8 + 1
        r = c.post("/api/judgments", headers=h, json={
            "item_id": nxt["item_id"], "likert": likert,
            "flags": {"A": ["hallucination"], "B": ["refusal", "harmful"]},
            "rating": "good" if k % 2 else "bad", "rationale": f"because {k}"})
        assert r.status_code == 201, r.text
        body = r.json()
        stored = likert if nxt["left_is"] == "response_a" else 9 - likert
        assert body["likert"] == likert and body["likert_stored"] == stored
        assert body["preferred"] == ("response_a" if stored <= 4 else "response_b")
        assert body["preferred_position"] == ("left" if likert <= 4 else "right")
        assert body["flags_stored"][nxt["left_is"]] == ["hallucination"]
        assert body["flags_stored"][nxt["right_is"]] == ["harmful", "refusal"]
        assert body["seconds"] >= 0
    # 40 items: both display orders occur (the chance of one order only is 2 * 2^-40).
    assert seen_sides == {"response_a", "response_b"}
    assert c.get("/api/next", headers=h).status_code == 204
    mine = c.get("/api/judgments", headers=h).json()["judgments"]
    assert len(mine) == 40 and mine[0]["rationale"] == "because 39"


def test_forced_left_side_b(db):
    """With response_b on the left, a 2 ("A is better") means response_b is preferred: stored 7."""
    import_pairs(db, make_pairs(1), overlap=1)
    [(uid, _)] = add_users(db, 1)
    served = service.next_item(db, uid, rng=FixedSide("response_b"))
    assert served.to_json()["responses"][0]["text"] == "answer B0"
    status, body = service.record_judgment(db, uid, service.parse_judgment(
        {"item_id": served.item.id, "likert": 2, "flags": {"A": ["refusal"]}}))
    assert status == 201
    [j] = judgments_in(db)
    assert (j.left_side, j.likert_shown, j.likert, j.preferred) == ("response_b", 2, 7, "response_b")
    assert j.flags == {"response_a": [], "response_b": ["refusal"]}


def test_overlap_and_nobody_sees_an_item_twice(db, client_for):
    import_pairs(db, make_pairs(3), overlap=2)
    users = add_users(db, 3)
    c = client_for(db)
    seen: dict[int, list[int]] = {}
    for uid, token in users[:2]:
        while True:
            r = c.get("/api/next", headers=bearer(token))
            if r.status_code == 204:
                break
            seen.setdefault(uid, []).append(r.json()["item_id"])
            assert c.post("/api/judgments", headers=bearer(token),
                          json={"item_id": r.json()["item_id"], "likert": 3}).status_code == 201
    assert all(sorted(v) == [1, 2, 3] for v in seen.values())
    # Every item has its 2 judgments: the third annotator has nothing to do.
    r = c.get("/api/next", headers=bearer(users[2][1]))
    assert r.status_code == 204 and r.content == b""
    assert c.get("/api/me", headers=bearer(users[2][1])).json()["queue_remaining"] == 0
    with db.reading() as s:
        per_item = dict(s.execute(select(Judgment.item_id, func.count()).group_by(Judgment.item_id)).all())
    assert per_item == {1: 2, 2: 2, 3: 2}


def test_skip_frees_the_slot_and_is_not_shown_again(db, client_for):
    import_pairs(db, make_pairs(2), overlap=1)
    (u0, t0), (u1, t1) = add_users(db, 2)
    c = client_for(db)
    first = c.get("/api/next", headers=bearer(t0)).json()["item_id"]
    assert c.post("/api/skip", headers=bearer(t0), json={"item_id": first}).json() == {"skipped": first}
    second = c.get("/api/next", headers=bearer(t0)).json()["item_id"]
    assert second != first
    assert c.post("/api/judgments", headers=bearer(t0), json={"item_id": second, "likert": 1}).status_code == 201
    assert c.get("/api/next", headers=bearer(t0)).status_code == 204  # the skipped one never returns
    assert c.get("/api/next", headers=bearer(t1)).json()["item_id"] == first  # its slot was freed
    assert c.post("/api/skip", headers=bearer(t0), json={"item_id": second}).status_code == 409
    assert c.post("/api/skip", headers=bearer(t0), json={"item_id": 999}).status_code == 404
    assert c.post("/api/skip", headers=bearer(t0), json={"item_id": "x"}).status_code == 422


def test_lease_expiry_offers_the_slot_to_others(db):
    import_pairs(db, make_pairs(1), overlap=1)
    (u0, _), (u1, _) = add_users(db, 2)
    assert service.next_item(db, u0).item.id == 1
    assert service.next_item(db, u1) is None  # the only slot is held by u0
    assert service.next_item(db, u1, lease_seconds=0) is not None  # an expired lease frees it
    # u0 can still submit (a judgment is never refused for being late): 2 judgments, none lost.
    for uid in (u0, u1):
        status, _ = service.record_judgment(db, uid, service.parse_judgment({"item_id": 1, "likert": 4}))
        assert status == 201
    assert len(judgments_in(db)) == 2


@pytest.mark.parametrize("body, needle", [
    ({}, "item_id: required"),
    ({"item_id": 1}, "likert: required"),
    ({"item_id": 1, "likert": 0}, "likert: must be an integer from 1 to 8 (got 0)"),
    ({"item_id": 1, "likert": 9}, "from 1 to 8 (got 9)"),
    ({"item_id": 1, "likert": 2.5}, "from 1 to 8"),
    ({"item_id": 1, "likert": True}, "from 1 to 8"),
    ({"item_id": "1", "likert": 2}, "item_id: must be an integer"),
    ({"item_id": 1, "likert": 2, "flags": ["x"]}, "flags: must be an object"),
    ({"item_id": 1, "likert": 2, "flags": {"C": []}}, "unknown response 'C'"),
    ({"item_id": 1, "likert": 2, "flags": {"A": ["rude"]}}, "unknown flag(s) 'rude'"),
    ({"item_id": 1, "likert": 2, "rating": "meh"}, "rating: must be"),
    ({"item_id": 1, "likert": 2, "rationale": 5}, "rationale: must be a string"),
    ({"item_id": 1, "likert": 2, "rationale": "x" * 20001}, "at most 20000 characters"),
    ({"item_id": 1, "likert": 2, "prefered": "a"}, "unknown field 'prefered'"),
    ([1, 2], "must be a JSON object"),
])
def test_invalid_bodies_get_422_with_a_readable_message(sqlite_db, client_for, body, needle):
    import_pairs(sqlite_db, make_pairs(1), overlap=1)
    [(_, token)] = add_users(sqlite_db, 1)
    c = client_for(sqlite_db)
    c.get("/api/next", headers=bearer(token))
    r = c.post("/api/judgments", headers=bearer(token), json=body)
    assert r.status_code == 422
    assert needle in r.json()["detail"]
    assert judgments_in(sqlite_db) == []


def test_other_request_errors(db, client_for):
    import_pairs(db, make_pairs(2), overlap=1)
    [(_, token)] = add_users(db, 1)
    c = client_for(db)
    h = bearer(token)
    r = c.post("/api/judgments", headers={**h, "Content-Type": "application/json"}, content=b"{nope")
    assert r.status_code == 422 and "not valid JSON" in r.json()["detail"]
    r = c.post("/api/judgments", headers=h, data={"item_id": "1", "likert": "2"})
    assert r.status_code == 415  # forms are refused: the API takes JSON only
    r = c.post("/api/judgments", headers=h, json={"item_id": 12345, "likert": 2})
    assert r.status_code == 404 and "does not exist" in r.json()["detail"]
    r = c.post("/api/judgments", headers=h, json={"item_id": 2, "likert": 2})
    assert r.status_code == 409 and "not served to you" in r.json()["detail"]
    assert judgments_in(db) == []


def test_duplicates_are_idempotent_conflicts_are_409(db, client_for):
    import_pairs(db, make_pairs(1), overlap=1)
    [(_, token)] = add_users(db, 1)
    c = client_for(db)
    h = bearer(token)
    item_id = c.get("/api/next", headers=h).json()["item_id"]
    body = {"item_id": item_id, "likert": 6, "flags": {"B": ["not_english"]}, "rating": "bad",
            "rationale": "x"}
    first = c.post("/api/judgments", headers=h, json=body)
    again = c.post("/api/judgments", headers=h, json=body)
    assert first.status_code == 201 and again.status_code == 200
    assert again.json()["duplicate"] is True and again.json()["id"] == first.json()["id"]
    changed = c.post("/api/judgments", headers=h, json={**body, "likert": 2})
    assert changed.status_code == 409
    assert "cannot be changed" in changed.json()["detail"]
    assert changed.json()["judgment"]["likert"] == 6  # the first judgment stands
    assert [j.likert_shown for j in judgments_in(db)] == [6]


def test_the_unique_constraint_catches_what_the_check_misses(db, monkeypatch):
    """Make the pre-insert check blind, as a racing request would be: the IntegrityError from the
    unique (item, annotator) constraint is turned into the same 200 / 409 answers."""
    import_pairs(db, make_pairs(1), overlap=1)
    [(uid, _)] = add_users(db, 1)
    service.next_item(db, uid)
    j = service.parse_judgment({"item_id": 1, "likert": 3})
    assert service.record_judgment(db, uid, j)[0] == 201
    real = service._existing_judgment
    calls = []

    def blind(s, item_id, user_id):
        calls.append(1)
        return None if len(calls) == 1 else real(s, item_id, user_id)

    monkeypatch.setattr(service, "_existing_judgment", blind)
    status, body = service.record_judgment(db, uid, j)
    assert status == 200 and body["duplicate"]
    calls.clear()
    with pytest.raises(service.LabelError) as e:
        service.record_judgment(db, uid, service.parse_judgment({"item_id": 1, "likert": 8}))
    assert e.value.status == 409
    assert len(judgments_in(db)) == 1


def test_disagreement_sends_items_to_extra_annotators(db):
    import_pairs(db, make_pairs(1, "split"), overlap=2, extra_on_disagreement=1)
    import_pairs(db, make_pairs(1, "agreed"), overlap=2, extra_on_disagreement=1)
    users = add_users(db, 3)
    side = FixedSide("response_a")
    # Two annotators disagree on item 1 and agree on item 2.
    for (uid, _), likerts in zip(users[:2], ([1, 2], [8, 3])):
        for likert in likerts:
            served = service.next_item(db, uid, rng=side)
            service.record_judgment(db, uid, service.parse_judgment(
                {"item_id": served.item.id, "likert": likert}))
    with db.reading() as s:
        targets = dict(s.execute(select(Item.id, Item.target)).all())
    assert targets == {1: 3, 2: 2}
    third = users[2][0]
    assert service.next_item(db, third).item.id == 1  # the disagreement goes to a third person
    service.record_judgment(db, third, service.parse_judgment({"item_id": 1, "likert": 1}))
    assert service.next_item(db, third) is None


def test_admin_endpoints_and_isolation(db, client_for):
    import_pairs(db, make_pairs(4), overlap=2)
    annotators = add_users(db, 2)
    [(_, admin)] = add_users(db, 1, role="admin", prefix="boss")
    c = client_for(db)
    side = FixedSide("response_a")
    # ann0 prefers A on every item, ann1 prefers B on items 1-2 and A on 3-4.
    for (uid, _), likerts in zip(annotators, ([2, 2, 2, 2], [7, 7, 2, 2])):
        for likert in likerts:
            served = service.next_item(db, uid, rng=side)
            service.record_judgment(db, uid, service.parse_judgment(
                {"item_id": served.item.id, "likert": likert}))
    ann_h = bearer(annotators[0][1])
    for path in ("/api/admin/stats", "/api/admin/export", "/api/admin/judgments"):
        assert c.get(path, headers=ann_h).status_code == 403
    assert c.post("/api/admin/escalate", headers=ann_h, json={"extra": 1}).status_code == 403
    assert c.get("/admin", headers=ann_h).status_code == 403
    mine = c.get("/api/judgments", headers=ann_h).json()["judgments"]
    assert len(mine) == 4 and {j["user_id"] for j in mine} == {annotators[0][0]}

    adm = bearer(admin)
    st = c.get("/api/admin/stats", headers=adm).json()
    assert st["progress"] == {"items": 4, "complete": 4, "in_progress": 0, "not_started": 0,
                              "judgments": 8, "wanted": 8, "skips": 0, "open_assignments": 0,
                              "annotators": 3}
    assert st["agreement"]["disagreeing_items"] == 2 and st["agreement"]["unanimous_items"] == 2
    assert st["agreement"]["pairwise_agreement"] == pytest.approx(0.5)
    # Left is always response_a here: A wins 6 of 8.
    assert st["position_bias"]["rate"] == pytest.approx(0.75)
    assert {a["name"]: a["n"] for a in st["annotators"]} == {"ann0": 4, "ann1": 4, "boss0": 0}
    assert len(st["disagreements"]) == 2
    assert len(c.get("/api/admin/judgments", headers=adm).json()["judgments"]) == 8
    items = c.get("/api/admin/items", headers=adm).json()["items"]
    assert [(i["item_id"], i["n"], i["agreement"], i["majority"]) for i in items] == [
        (1, 2, 0.5, None), (2, 2, 0.5, None), (3, 2, 1.0, "response_a"), (4, 2, 1.0, "response_a")]
    assert c.get("/api/admin/items", headers=ann_h).status_code == 403

    export = c.get("/api/admin/export", headers=adm)
    assert export.headers["content-type"].startswith("application/x-ndjson")
    assert len(export.text.splitlines()) == 2  # the two split items are dropped
    assert len(c.get("/api/admin/export?keep_ties=true", headers=adm).text.splitlines()) == 4

    page = c.get("/admin", headers=adm)
    assert page.status_code == 200 and "Krippendorff" in page.text and "ann1" in page.text
    assert "4 items: 4 complete, 0 in progress, 0 not started" in page.text
    assert "<built-in" not in page.text

    r = c.post("/api/admin/escalate", headers=adm, json={"extra": 1})
    assert r.json() == {"escalated": [1, 2]}
    assert c.post("/api/admin/escalate", headers=adm, json={"extra": 0}).status_code == 422
    st = c.get("/api/admin/stats", headers=adm).json()
    assert st["progress"]["wanted"] == 10 and st["progress"]["complete"] == 2
    # The admin can judge too: the two escalated items are now in their queue.
    assert c.get("/api/next", headers=adm).json()["item_id"] == 1


def test_admin_escalate_form(sqlite_db, client_for):
    import_pairs(sqlite_db, make_pairs(1), overlap=2)
    users = add_users(sqlite_db, 2)
    [(_, admin)] = add_users(sqlite_db, 1, role="admin", prefix="boss")
    for (uid, _), likert in zip(users, (1, 8)):
        service.next_item(sqlite_db, uid, rng=FixedSide("response_a"))
        service.record_judgment(sqlite_db, uid, service.parse_judgment({"item_id": 1, "likert": likert}))
    c = client_for(sqlite_db)
    c.get("/", params={"token": admin})
    r = c.post("/admin/escalate", data={"extra": "2"})
    assert r.status_code == 200 and "Sent 1 disagreeing item to more annotators" in r.text


def test_pages_render(sqlite_db, client_for):
    import_pairs(sqlite_db, [Pair(prompt=[{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "Hello there"},
                                          {"role": "assistant", "content": "Hi! How can I help?"},
                                          {"role": "user", "content": "Name a colour."}],
                                  response_a="Blue.", response_b="Colours are wavelengths.")],
                 overlap=1)
    [(_, token)] = add_users(sqlite_db, 1)
    c = client_for(sqlite_db)
    c.get("/", params={"token": token})
    page = c.get("/")
    assert page.status_code == 200
    html = page.text
    for text in ("Hello there", "Hi! How can I help?", "Name a colour.", "Blue.",
                 "Colours are wavelengths.", "A is much better", "B is much better",
                 "Hallucination", "Harmful", "Fails the task", "Refusal", "Not English",
                 "Contains personal data", "good", "bad", "Rationale", "Skip", "/static/label.js"):
        assert text in html, text
    assert html.index("Response A") < html.index("Response B")
    assert "Content-Security-Policy" in page.headers
    assert c.get("/static/label.js").status_code == 200
    assert c.get("/static/label.css").status_code == 200
    item_id = c.get("/api/next").json()["item_id"]
    assert c.post("/api/judgments", json={"item_id": item_id, "likert": 5}).status_code == 201
    assert "Your queue is empty" in c.get("/").text
    mine = c.get("/mine").text
    assert "B is marginally better" in mine and "Name a colour." in mine
