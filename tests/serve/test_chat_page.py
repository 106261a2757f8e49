"""The chat page at ``/`` in a real headless browser: Debian's chromium driven by Playwright.

Run: ``.venv/bin/pytest tests/serve/test_chat_page.py``. Needs the ``chromium`` executable
(``apt-get install chromium``; ``.ci/run`` installs it when missing). Playwright's own
browser download is never used: it is launched with ``executable_path``.
"""

from __future__ import annotations

import shutil

import httpx
import pytest

from lmforge.models.rnn import GRUModel
from lmforge.trained import load_model
from tests.serving import make_run, server_for

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install "
                                                          "chromium); the chat page test needs a real browser")
# Resolves once the reply shows more than `arg` characters, or an error message appeared instead.
SHOWN_OR_FAILED = """(n) => {
  const reply = document.querySelector('.msg.assistant');
  return document.querySelector('.msg.error') !== null || (reply !== null && reply.textContent.length > n);
}"""
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic"]


class EndlessGRU(GRUModel):
    """A GRU that never ends a turn (its stop tokens get -inf), so a reply runs until the user stops it."""

    stop_ids: list[int] = []

    def step(self, idx, state):
        logits, state = super().step(idx, state)
        logits[..., self.stop_ids] = float("-inf")
        return logits, state


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat-page")
    return {"transformer": make_run(root), "gru": make_run(root, "gru")}


def test_typing_a_message_streams_a_reply(browser, runs):
    server = server_for(runs["transformer"])
    try:
        # The page's defaults (temperature 0.8, top p 0.95) with a fixed seed: find one whose reply is not empty.
        body = {"messages": [{"role": "user", "content": "Good morrow!"}], "temperature": 0.8, "top_p": 0.95,
                "max_tokens": 12}
        seed, expected = next((s, text) for s in range(20) if (text := httpx.post(
            f"{server.base_url}/chat/completions", json={**body, "seed": s}).json()["choices"][0]["message"]
            ["content"]))
        page = browser.new_page()
        page.goto(server.url)
        page.wait_for_function("document.getElementById('model').textContent.includes('tiny-transformer')")
        assert "context 128" in page.text_content("#model")
        page.fill("#max_tokens", "12")
        page.fill("#seed", str(seed))
        page.fill("#prompt", "Good morrow!")
        page.press("#prompt", "Enter")  # Enter sends, like the Send button
        page.wait_for_selector(".msg.assistant[data-finished], .msg.error")
        assert page.query_selector(".msg.error") is None, page.text_content(".msg.error")
        assert page.text_content(".msg.user") == "Good morrow!"
        assert page.text_content(".msg.assistant") == expected
        assert page.text_content("#status") in ("done", "stopped at max tokens")
        assert page.is_enabled("#send") and not page.is_enabled("#stop")
        page.close()
    finally:
        server.stop()


def test_stop_button_ends_the_reply_and_frees_the_slot(browser, runs):
    tm = load_model(runs["gru"])
    model = EndlessGRU(tm.cfg.model)
    model.load_state_dict(tm.model.state_dict())
    model.stop_ids = tm.tokenizer.end_ids
    server = server_for(runs["gru"], model=model)
    sched = server.app.state.scheduler
    try:
        page = browser.new_page()
        page.goto(server.url)
        page.fill("#max_tokens", "1000000")
        page.fill("#prompt", "Speak on")
        page.click("#send")
        page.wait_for_function(SHOWN_OR_FAILED, arg=20)
        assert page.query_selector(".msg.error") is None, page.text_content(".msg.error")
        assert sched.running == 1
        page.click("#stop")
        page.wait_for_selector(".msg.assistant[data-finished='stopped']")
        assert page.text_content("#status") == "stopped"
        assert sched.wait_until(lambda: sched.running == 0 and not sched.batch.rows, timeout=10)
        page.close()
    finally:
        server.stop()
