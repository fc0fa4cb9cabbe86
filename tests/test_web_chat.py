"""The web chat page end to end: `lmforge serve` on a tiny model, driven in headless Chromium with Playwright.

Uses the system Chromium (Debian's `chromium` package) and never downloads a browser; skips where it is absent.
The screenshot goes to test-artifacts/web_chat.png (git-ignored) for a person to look at.
"""

import os
from pathlib import Path

import pytest
from test_chat_repl import tiny_model_folder

from lmforge.serve.process import start_server, stop_server

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is absent (apt-get install chromium)")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tiny_model_folder(tmp_path_factory.mktemp("web") / "model")
    proc, url = start_server(folder, "--api-key", "page-key")
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def page():
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (no browser download needed)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1100, "height": 720})
        yield page
        browser.close()


def test_streamed_answer_with_token_probabilities(server, page):
    refused = []  # Chromium reports each Content-Security-Policy violation on the console
    page.on("console", lambda m: refused.append(m.text) if "Content Security Policy" in m.text else None)
    response = page.goto(server + "/")
    headers = response.headers
    assert (
        "script-src 'self'" in headers["content-security-policy"]
        and "frame-ancestors 'none'" in headers["content-security-policy"]
    )
    assert headers["x-frame-options"] == "DENY" and headers["x-content-type-options"] == "nosniff"
    assert page.title() == "lmforge chat"
    # Accessible controls: every setting has a label.
    for control in ("System prompt", "Temperature", "Max tokens", "API key", "Message"):
        assert page.get_by_label(control).count() == 1, control
    # Without the key the server refuses, and the page says so instead of failing silently.
    page.get_by_label("Message").fill("hello there")
    page.keyboard.press("Enter")
    page.wait_for_selector("#status.error", timeout=45_000)
    assert "401" in page.inner_text("#status")
    assert "API key" in page.locator(".message.assistant.failed .body").inner_text()

    page.get_by_label("API key").fill("page-key")
    page.get_by_label("Max tokens").fill("40")
    # Greedy: a sampled answer of this random model may start with its end token and come back empty.
    page.eval_on_selector("#temperature", "el => { el.value = '0'; el.dispatchEvent(new Event('input')); }")
    page.get_by_label("Message").fill("the cat sat")
    page.keyboard.press("Shift+Enter")  # a newline, not a send
    assert page.locator(".message.assistant .tok").count() == 0
    page.keyboard.type("on the mat")
    assert page.get_by_label("Message").input_value() == "the cat sat\non the mat"

    # The answer streams: a MutationObserver records the token count of the answer at every DOM change, so
    # the count must take several values (chunks rendered as they arrive), not jump from 0 to the end.
    page.evaluate("""() => {
        window.__counts = [];
        new MutationObserver(() => {
            const bodies = document.querySelectorAll('.message.assistant .body');
            window.__counts.push(bodies[bodies.length - 1].querySelectorAll('.tok').length);
        }).observe(document.getElementById('log'), {childList: true, subtree: true});
    }""")
    page.keyboard.press("Enter")
    answer = page.locator(".message.assistant .body").last
    # Predicates are functions, not expression strings: the page's Content-Security-Policy forbids eval.
    page.wait_for_function(
        "() => window.__counts.length > 0 && !document.querySelector('.body.streaming')", timeout=60_000
    )
    seen = page.evaluate("window.__counts")
    final = answer.locator(".tok").count()
    assert final > 1 and answer.inner_text().strip()
    assert len(set(c for c in seen if 0 < c < final)) >= 2, f"the answer did not grow while streaming: {seen}"
    assert page.locator(".message.user .body").last.inner_text() == "the cat sat\non the mat"

    probs = [float(p) for p in answer.locator(".tok").evaluate_all("spans => spans.map(s => s.dataset.prob)")]
    assert all(0 < p <= 1 for p in probs)

    # Hovering a token shows its probability and the top alternatives.
    token = answer.locator(".tok").nth(min(2, final - 1))
    token.hover()
    tip = page.locator("#tip")
    tip.wait_for(state="visible", timeout=5_000)
    text = tip.inner_text()
    assert "p = " in text and "%" in text and "top alternatives" in text
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web_chat.png"), full_page=True)

    # A second turn sends the history: two answers on the page, "New conversation" clears them.
    page.get_by_label("Message").fill("and then?")
    page.keyboard.press("Enter")
    page.wait_for_function(
        "() => document.querySelectorAll('.message.assistant').length == 3 && "
        "!document.querySelector('.body.streaming')",
        timeout=60_000,
    )
    page.get_by_role("button", name="New conversation").click()
    assert page.locator(".message").count() == 0
    assert refused == [], refused  # the page did all of this under its policy
