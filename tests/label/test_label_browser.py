"""A real browser (Debian's chromium driven by Playwright) judges a pair and ranks completions with the
keyboard and the mouse.

`make test` installs chromium when it is missing (scripts/ensure_browser.sh); where it cannot be
installed this test skips and says so. Set RLHFKIT_LABEL_SCREENSHOT=/path.png to keep a
screenshot of the judging page.
"""

from __future__ import annotations

import os

import pytest
from sqlalchemy import select

from rlhfkit.label import service
from rlhfkit.label.db import Database, Item, Judgment, Ranking
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

    page.click('input[name="quality-A"][value="good"]')  # each response on its own: A good, B bad
    page.click('input[name="quality-B"][value="bad"]')
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
    assert j.quality == {j.left_side: "good", ({"response_a", "response_b"} - {j.left_side}).pop(): "bad"}
    assert j.seconds >= 0


def _shown_labels(page, k: int) -> dict[str, str]:
    """Text -> the label it is shown under."""
    return {page.inner_text(f"#response-{label} .text").strip(): label for label in "ABCD"[:k]}


def test_rank_with_the_keyboard_and_with_the_mouse(tmp_path, live_server, browser):
    db_path = str(tmp_path / "labels.db")
    db = Database(db_path)
    first = ["Paris.", "Lyon, I think.", "Berlin. " + XSS]
    second = ["Four.", "Three.", "Five.", "Twenty-two."]
    import_pairs(db, [Pair.ranking("What is the capital of France?", first),
                      Pair.ranking("What is 2 + 2?", second)], overlap=1)
    user, token, _ = service.add_user(db, "ranker")
    db.dispose()
    server = live_server(db_path)

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"{server.url}/?token={token}")
    page.wait_for_selector("#rank")
    assert "capital of France" in page.inner_text(".conversation")
    shown = _shown_labels(page, 3)
    assert ("Berlin. " + XSS).strip() in shown  # the <script> is text ...
    assert page.evaluate("typeof window.__pwned") == "undefined"  # ... and ran nothing
    # Keyboard: worst first by mistake, Backspace, then best, middle (the last is placed for us).
    page.keyboard.press(str("ABC".index(shown["Berlin. " + XSS.strip()]) + 1))
    page.keyboard.press("Backspace")
    page.keyboard.press(str("ABC".index(shown["Lyon, I think."]) + 1))
    page.keyboard.press(str("ABC".index(shown["Paris."]) + 1))
    ranked = [li.get_attribute("data-label") for li in page.query_selector_all("#ranking li")]
    assert ranked == [shown["Lyon, I think."], shown["Paris."], shown["Berlin. " + XSS.strip()]]
    page.focus("#ranking li:nth-child(2)")  # Paris moves up with the arrow key
    page.keyboard.press("ArrowUp")
    ranked = [li.get_attribute("data-label") for li in page.query_selector_all("#ranking li")]
    assert ranked[:2] == [shown["Paris."], shown["Lyon, I think."]]
    page.keyboard.press("g")
    page.keyboard.press("Enter")

    # Mouse: the second item, "Next best" in the order Four, Five, Three (Twenty-two placed last),
    # then Three moved above Five with its button.
    page.wait_for_selector('#rank[data-k="4"]', timeout=30_000)
    shown = _shown_labels(page, 4)
    for text in ["Four.", "Five.", "Three."]:
        page.click(f'button.pick[data-label="{shown[text]}"]')
    page.click(f'#ranking li[data-label="{shown["Three."]}"] button[title^="Move {shown["Three."]} up"]')
    page.click("#submit")
    page.wait_for_selector("#empty", timeout=30_000)
    assert errors == []

    db = Database(db_path)
    with db.reading() as s:
        rows = s.scalars(select(Ranking).order_by(Ranking.id)).all()
    db.dispose()
    assert [(r.user_id, r.ranking, r.rating) for r in rows] == [(user.id, [0, 1, 2], "good"),
                                                               (user.id, [0, 1, 2, 3], None)]


def test_a_live_conversation_against_two_scripted_models(tmp_path, live_server, browser):
    from scripted_endpoint import ScriptedEndpoint

    def reply(body):
        last = body["messages"][-1]["content"]
        return f"alpha answers {last}" if body["model"] == "alpha" else f"beta answers {last} {XSS}"

    db_path = str(tmp_path / "labels.db")
    db = Database(db_path)
    user, token, _ = service.add_user(db, "live-annotator")
    db.dispose()
    with ScriptedEndpoint(reply) as ep:
        server = live_server(db_path, "--live-url", ep.url, "--live-model", "alpha",
                             "--live-url", ep.url, "--live-model", "beta")
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"{server.url}/?token={token}")
        page.goto(f"{server.url}/live")
        # Turn 1, keyboard: write, Ctrl+Enter, then the point for beta's reply and Enter.
        page.fill("#user-turn", "Hello there")
        page.keyboard.press("Control+Enter")
        page.wait_for_selector("#choice:not([hidden])", timeout=30_000)
        beta = f"beta answers Hello there {XSS}"
        texts = [page.inner_text(f"#response-{x} .text").strip() for x in "AB"]
        assert sorted(texts) == sorted(["alpha answers Hello there", beta.strip()])
        assert page.evaluate("typeof window.__pwned") == "undefined"  # model output stays text
        page.keyboard.press("1" if texts[0] == beta.strip() else "8")  # beta, "much better"
        page.keyboard.press("Enter")
        page.wait_for_selector("#message.good", timeout=30_000)
        assert page.inner_text("#turns .role-assistant .text").strip() == beta.strip()
        # Turn 2, mouse: Send, then click the point for alpha's reply and Submit.
        page.fill("#user-turn", "Tell me more")
        page.click("#send")
        page.wait_for_selector("#choice:not([hidden])", timeout=30_000)
        left = page.inner_text("#response-A .text").strip()
        page.click(f'.point:has(input[value="{2 if left.startswith("alpha") else 7}"])')
        page.click("#submit")
        page.wait_for_selector("#message.good", timeout=30_000)
        assert len(page.query_selector_all("#turns .turn")) == 4
        assert errors == []
        assert ep.seen[-1]["messages"][1] == {"role": "assistant", "content": beta}

    db = Database(db_path)
    with db.reading() as s:
        rows = s.execute(select(Judgment, Item).join(Item, Item.id == Judgment.item_id).order_by(Judgment.id)).all()
    db.dispose()
    assert [(j.user_id, item.meta[f"model_{j.preferred[-1]}"], item.meta["live"]["turn"]) for j, item in rows] == [
        (user.id, "beta", 1), (user.id, "alpha", 2)]
    assert rows[1][1].prompt == [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": beta},
                                 {"role": "user", "content": "Tell me more"}]
