"""The Gradio chat page in headless Chromium: a typed message streams in as the same
text the server answers without streaming (greedy, the bundled demo model), a
second turn carries the first, and server errors show up in the chat.

Needs gradio, playwright and a Chromium executable (`chromium` on PATH, or the
environment variable TPSERVE_CHROMIUM); skips without them.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time

import httpx
import pytest

from tpserve.cluster.local_server import BackgroundServer, free_port
from tpserve.cluster.webui import ERROR_MARK, GenerationDefaults, build_webui, history_to_messages

GREEDY = GenerationDefaults(max_tokens=40, temperature=0.0, top_p=1.0)
OBSERVE_JS = """() => {
  // Watches the whole body: Gradio may mount (or re-mount) the chatbot after the input box.
  window.__shown = [];
  const record = () => {
    const bots = document.querySelectorAll('#tpserve-chatbot [data-testid="bot"]');
    const text = bots.length ? bots[bots.length - 1].innerText : null;
    if (text !== null && window.__shown[window.__shown.length - 1] !== text) window.__shown.push(text);
  };
  new MutationObserver(record).observe(document.body,
                                       {childList: true, subtree: true, characterData: true});
}"""
LAST_BOT_JS = """() => {
  const bots = document.querySelectorAll('#tpserve-chatbot [data-testid="bot"]');
  return bots.length ? bots[bots.length - 1].innerText : '';
}"""


class RecordChatBodies:
    """ASGI wrapper keeping the JSON body of every POST /v1/chat/completions."""

    def __init__(self, app) -> None:
        self.app, self.bodies = app, []

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] != "/v1/chat/completions":
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []

        async def recording_receive():
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                self.bodies.append(json.loads(b"".join(chunks)))
            return message

        await self.app(scope, recording_receive, send)


def _chromium() -> str:
    path = os.environ.get("TPSERVE_CHROMIUM") or shutil.which("chromium") \
        or shutil.which("chromium-browser")
    if not path:
        pytest.skip("no Chromium executable: apt-get install chromium, or set TPSERVE_CHROMIUM")
    return path


@pytest.fixture(scope="module")
def browser():
    pytest.importorskip("gradio")
    sync_api = pytest.importorskip("playwright.sync_api")
    executable = _chromium()
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable, headless=True,
                                              args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def api(browser):
    from tpserve.cluster.deployment import llm_engine_factory
    from tpserve.cluster.openai_api import build_api_app
    from tpserve.cluster.serve_config import ServeConfig

    config = ServeConfig(model=None, instance_num=4,
                         engine_options={"session_len": 256, "cache_max_entry_count": 32})
    serving = llm_engine_factory(config)
    recorder = RecordChatBodies(build_api_app(serving, shutdown_engine=True))
    with BackgroundServer(recorder) as url:
        yield url, recorder.bodies


@contextlib.contextmanager
def opened(browser, url: str, **options):
    """A browser tab on a freshly launched page for the server at `url`."""
    page_app = build_webui(url, **options)
    port = free_port()
    page_app.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True,
                            quiet=True)
    tab = browser.new_page()
    try:
        tab.goto(f"http://127.0.0.1:{port}/")
        tab.locator("#tpserve-input textarea").wait_for(timeout=20_000)
        tab.locator("#tpserve-chatbot").wait_for(state="attached", timeout=20_000)
        yield tab
    finally:
        tab.close()
        page_app.close()


def _flat(text: str) -> str:
    return " ".join(text.split())


def _send_and_wait(tab, message: str, done, timeout: float = 30.0) -> str:
    """Types `message`, presses Send and returns the last reply once `done(text)` holds."""
    tab.evaluate(OBSERVE_JS)
    tab.locator("#tpserve-input textarea").fill(message)
    tab.locator("#tpserve-send").click()
    deadline = time.monotonic() + timeout
    while True:
        text = _flat(tab.evaluate(LAST_BOT_JS))
        if done(text) or time.monotonic() > deadline:
            return text
        time.sleep(0.05)


def _greedy_reply(url: str, messages: list[dict]) -> str:
    body = {"messages": messages, "max_tokens": GREEDY.max_tokens, "temperature": 0.0,
            "top_p": 1.0}
    response = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


@pytest.mark.slow
def test_page_streams_the_greedy_reply_over_two_turns(browser, api):
    url, bodies = api
    first = [{"role": "user", "content": "Tell me a story."}]
    expected = _greedy_reply(url, first)
    assert len(expected.split()) > 5  # long enough to be seen growing
    with opened(browser, url, defaults=GREEDY) as tab:
        del bodies[:]
        shown = _send_and_wait(tab, first[0]["content"], lambda t: len(t) >= len(_flat(expected)))
        assert shown == _flat(expected)
        assert bodies[-1]["stream"] is True and bodies[-1]["messages"] == first
        assert bodies[-1]["temperature"] == 0 and bodies[-1]["max_tokens"] == GREEDY.max_tokens
        snapshots = [_flat(s) for s in tab.evaluate("() => window.__shown")]
        partial = [s for s in snapshots if s and s != shown and shown.startswith(s)]
        assert partial, f"the reply never showed a proper prefix on its way: {snapshots}"
        assert tab.locator("#tpserve-input textarea").input_value() == ""

        second = first + [{"role": "assistant", "content": expected},
                          {"role": "user", "content": "And then?"}]
        expected2 = _greedy_reply(url, second)
        shown2 = _send_and_wait(tab, "And then?", lambda t: len(t) >= len(_flat(expected2))
                                and t != shown)
        assert shown2 == _flat(expected2)
        assert bodies[-1]["messages"] == second


@pytest.mark.slow
def test_page_shows_server_errors_in_the_chat(browser, api):
    url, _ = api
    dead = f"http://127.0.0.1:{free_port()}"
    with opened(browser, dead, defaults=GREEDY) as tab:
        shown = _send_and_wait(tab, "hello", lambda t: "error" in t, timeout=20)
        assert shown.startswith(_flat(ERROR_MARK)) and f"cannot reach {dead}" in shown
        tab.locator("#tpserve-clear").click()
        tab.wait_for_function("() => !document.querySelector('#tpserve-chatbot [data-testid=\"bot\"]')",
                              timeout=10_000)
    with opened(browser, url, model="no-such-model", defaults=GREEDY) as tab:
        shown = _send_and_wait(tab, "hello", lambda t: "error" in t, timeout=20)
        assert "HTTP 404" in shown and "no-such-model" in shown and "Traceback" not in shown


def test_failed_turns_are_not_sent_back():
    history = [{"role": "user", "content": [{"type": "text", "text": "hi"}]},  # gradio 6 parts
               {"role": "assistant", "content": [{"type": "text", "text": "hello"}]},
               {"role": "user", "content": "boom"},
               {"role": "assistant", "content": ERROR_MARK + "error: HTTP 400: too long"}]
    assert history_to_messages(history, "again") == [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "again"}]


def test_cli_without_gradio_prints_how_to_install(monkeypatch, capsys):
    from tpserve.cluster.cli import main

    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio -> ImportError
    assert main(["serve", "gradio", "http://127.0.0.1:1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'tpserve[webui]'" in err
