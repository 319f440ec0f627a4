"""Untrusted text (model outputs, prompts, rationales, names) is stored verbatim and shown inert."""

from __future__ import annotations

import json
import re

from label_helpers import bearer
from sqlalchemy import func, inspect, select

from rlhfkit.label import service
from rlhfkit.label.db import Item, Judgment
from rlhfkit.label.importer import Pair, import_pairs

SCRIPT = "<script>window.__pwned = 1; alert('xss')</script>"
IMG = '<img src=x onerror="window.__pwned=2">'
SQL = "'); DROP TABLE judgments; -- \" OR 1=1; DELETE FROM users WHERE '1'='1"
NAME = "<b>mallory</b>'; DROP TABLE users;--"


def test_injection_is_stored_verbatim_and_rendered_as_text(db, client_for):
    prompt = f"Summarise this: {SQL}"
    import_pairs(db, [Pair(prompt=prompt, response_a=SCRIPT, response_b=IMG + " " + SQL)], overlap=1)
    user, token, _ = service.add_user(db, NAME, "admin")
    c = client_for(db)
    c.get("/", params={"token": token})

    page = c.get("/")
    html = page.text
    assert page.status_code == 200
    # Escaped, not executable: the only script tags are the app's own files.
    assert "&lt;script&gt;window.__pwned = 1; alert(&#39;xss&#39;)&lt;/script&gt;" in html
    assert "&lt;img src=x onerror=" in html
    assert SCRIPT not in html and IMG not in html
    assert re.findall(r"<script[^>]*>", html) == ['<script src="/static/common.js" defer>',
                                                  '<script src="/static/label.js" defer>']
    assert "&lt;b&gt;mallory&lt;/b&gt;" in html and "<b>mallory</b>" not in html
    assert "script-src 'self'" in page.headers["content-security-policy"]  # no inline scripts

    # The API returns the text exactly as imported.
    nxt = c.get("/api/next").json()
    assert {r["text"] for r in nxt["responses"]} == {SCRIPT, IMG + " " + SQL}
    assert nxt["prompt"] == prompt
    nul = c.post("/api/judgments", json={"item_id": nxt["item_id"], "likert": 1, "rationale": "a\u0000b"})
    assert nul.status_code == 422 and "NUL" in nul.json()["detail"]  # PostgreSQL cannot store it
    rationale = f"{SCRIPT} {SQL} \u202e end"
    r = c.post("/api/judgments", json={"item_id": nxt["item_id"], "likert": 1, "rationale": rationale})
    assert r.status_code == 201

    # Every table is still there, nothing was deleted, and the text round-trips exactly.
    names = set(inspect(db.engine).get_table_names())
    assert {"users", "items", "assignments", "judgments", "web_sessions"} <= names
    with db.reading() as s:
        assert s.scalar(select(func.count(Judgment.id))) == 1
        assert s.scalars(select(Judgment.rationale)).one() == rationale
        item = s.scalars(select(Item)).one()
        assert (item.prompt, item.response_a, item.response_b) == (prompt, SCRIPT, IMG + " " + SQL)
    assert service.user_for_token(db, token).name == NAME

    # The other pages escape it too.
    for path in ("/mine", "/admin"):
        text = c.get(path).text
        assert SCRIPT not in text and "<b>mallory</b>" not in text, path
    assert "&lt;script&gt;" in c.get("/mine").text
    # And the export keeps it verbatim (as JSON, not HTML).
    row = json.loads(c.get("/api/admin/export").text.splitlines()[0])
    assert row["chosen"] in (SCRIPT, IMG + " " + SQL) and row["prompt"] == prompt


def test_sql_in_lookups_is_just_data(db, client_for):
    """SQL-looking tokens, ids and names are bound parameters: they match nothing and break nothing."""
    service.add_user(db, "alice")
    c = client_for(db)
    for token in ("' OR '1'='1", "x' UNION SELECT token_hash FROM users --", SQL):
        assert c.get("/api/me", headers=bearer(token)).status_code == 401
        assert c.get("/", params={"token": token}).status_code == 401
    c.cookies.set("rlhfkit_label_session", "' OR 1=1 --")
    assert c.get("/api/me").status_code == 401
    assert "users" in inspect(db.engine).get_table_names()
