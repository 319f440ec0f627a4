"""A real browser (Debian's chromium driven by Playwright) judges an item with the keyboard.

`make test` installs chromium when it is missing (scripts/ensure_browser.sh); where it cannot be
installed this test skips and says so. Set RLHFKIT_LABEL_SCREENSHOT=/path.png to keep a
screenshot of the judging page.
"""

from __future__ import annotations

import os

import pytest
from sqlalchemy import select

from rlhfkit.label import service
from rlhfkit.label.db import Database, Item, Judgment
from rlhfkit.label.importer import Pair, import_pairs

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
XSS = "<script>window.__pwned = 1</script><img src=x onerror=\"window.__pwned = 2\">"

pytestmark = pytest.mark.browser


@pytest.fixture
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium, "
                    "as `make test` does) to run the browser test")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            yield b
        finally:
            b.close()


def test_sign_in_and_judge_with_the_keyboard(tmp_path, live_server, browser):
    db_path = str(tmp_path / "labels.db")
    db = Database(db_path)
    import_pairs(db, [Pair(prompt=[{"role": "user", "content": "What is the capital of France?"},
                                   {"role": "assistant", "content": "Paris."},
                                   {"role": "user", "content": "And of Italy? Answer briefly."}],
                           response_a="Rome.",
                           response_b="The capital of Italy is Milan. " + XSS)], overlap=1)
    user, token, _ = service.add_user(db, "browser-annotator")
    db.dispose()
    server = live_server(db_path)

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"{server.url}/?token={token}")
    page.wait_for_selector("#judge")
    assert page.url == f"{server.url}/"  # the token left the address bar
    assert "capital of France" in page.inner_text(".conversation")
    left_text = page.inner_text("#response-A .text")
    right_text = page.inner_text("#response-B .text")
    assert {left_text.strip(), right_text.strip()} == {"Rome.", ("The capital of Italy is Milan. " + XSS).strip()}
    # The <script> in the model output is shown as text and ran nothing.
    assert "<script>window.__pwned = 1</script>" in left_text + right_text
    assert page.evaluate("typeof window.__pwned") == "undefined"
    if os.environ.get("RLHFKIT_LABEL_SCREENSHOT"):
        page.keyboard.press("7")
        page.keyboard.press("g")
        page.screenshot(path=os.environ["RLHFKIT_LABEL_SCREENSHOT"], full_page=True)

    page.keyboard.press("2")  # "A is better": the left response
    assert page.is_checked('input[name="likert"][value="2"]')
    page.keyboard.press("Enter")
    page.wait_for_selector("#empty", timeout=30_000)  # saved; the queue (one item) is empty
    assert "Your queue is empty" in page.inner_text("#empty")
    assert errors == []

    db = Database(db_path)
    with db.reading() as s:
        [j] = s.scalars(select(Judgment)).all()
        item = s.get(Item, j.item_id)
    db.dispose()
    assert j.user_id == user.id and j.likert_shown == 2
    # The display order was random: the response shown on the left is the one preferred.
    assert item.text(j.left_side).strip() == left_text.strip()
    assert j.preferred == j.left_side
    assert j.likert == (2 if j.left_side == "response_a" else 7)
    assert j.seconds >= 0
