"""A real uvicorn server on 127.0.0.1 answering the official `openai` client, raw sockets
that disconnect early, the api_client REPL and the web UI's stream reader."""
from __future__ import annotations

import asyncio
import io
import json
import time

import httpx
import openai
import pytest

from api_fakes import MODEL_ID, make_serving
from tpserve.cluster.clients import api_client_repl
from tpserve.cluster.local_server import BackgroundServer
from tpserve.cluster.openai_api import APIOptions, build_api_app
from tpserve.cluster.webui import chat_stream, history_to_messages

MESSAGES = [{"role": "user", "content": "tell me"}]


@pytest.fixture(scope="module")
def server():
    serving = make_serving(session_len=256, token_delay=0.002)
    app = build_api_app(serving, APIOptions(api_keys=("sk-test",)), shutdown_engine=True)
    with BackgroundServer(app) as url:
        yield url, serving
    assert serving.engine.shut_down


@pytest.fixture(scope="module")
def client(server):
    url, _ = server
    return openai.OpenAI(base_url=url + "/v1", api_key="sk-test", max_retries=0)


def test_openai_chat_stream_equals_non_stream(client):
    whole = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=20,
                                           temperature=0)
    stream = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=20,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and len(text) == 20
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_openai_completions(client):
    whole = client.completions.create(model=MODEL_ID, prompt="abc", max_tokens=8, temperature=0)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL_ID, prompt="abc", max_tokens=8, temperature=0, stream=True))
    assert streamed == whole.choices[0].text and whole.usage.completion_tokens == 8
    assert client.models.list().data[0].id == MODEL_ID


def test_openai_errors_then_still_serving(client, server):
    url, _ = server
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "x" * 400}])
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL_ID, prompt="a", max_tokens=-3)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    headers = {"Authorization": "Bearer sk-test"}
    r = httpx.post(url + "/v1/completions", content=b"{oops", headers=headers)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(url + "/v1/completions", content=b"x" * (5 << 20), headers=headers)
    assert r.status_code == 413
    assert client.completions.create(model=MODEL_ID, prompt="a", max_tokens=2).choices[0].text


async def _stream(url: str, i: int, disconnect: bool) -> str:
    """One streamed chat over a raw connection; closes the socket after 3 events if asked."""
    body = json.dumps({"model": MODEL_ID, "messages": [{"role": "user", "content": f"q{i}"}],
                       "max_tokens": 60, "ignore_eos": True, "stream": True}).encode()
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer sk-test\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    await writer.drain()
    data, events = b"", 0
    while True:
        chunk = await asyncio.wait_for(reader.read(4096), 20)
        if not chunk:
            break
        data += chunk
        events = data.count(b"data: ")
        if disconnect and events >= 3:
            writer.close()
            return "disconnected"
        if b"data: [DONE]" in data:
            break
    writer.close()
    return data.decode()


def test_concurrent_streams_and_disconnects_abort(server):
    url, serving = server
    engine = serving.engine
    before_aborted, before_finished = len(engine.aborted), len(engine.finished)

    async def main():
        return await asyncio.gather(*[_stream(url, i, disconnect=i % 3 == 0) for i in range(32)])

    # streams long enough (60 tokens x 10 ms) that a loaded machine notices each
    # disconnect before the request would have finished anyway
    engine.token_delay, delay = 0.01, engine.token_delay
    try:
        results = asyncio.run(main())
    finally:
        engine.token_delay = delay
    done = [r for r in results if r != "disconnected"]
    assert len(done) == 21 and all(r.count('"finish_reason": "length"') == 1 for r in done)
    deadline = time.monotonic() + 10
    while (engine.running or len(engine.aborted) - before_aborted < 11) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(engine.aborted) - before_aborted == 11, "each disconnected stream must abort its request"
    assert len(engine.finished) - before_finished == 21
    assert not engine.running


def test_api_client_repl(server):
    url, serving = server
    inputs = iter(["hello", "", "again", "", "end", "", "exit", ""])
    out = io.StringIO()
    api_client_repl(url, session_id=42, api_key="sk-test", request_output_len=5,
                    input_fn=lambda prompt: next(inputs), out=out)
    lines = out.getvalue().splitlines()
    assert len(lines[0]) == 5 and len(lines[1]) == 5 and "session ended" in lines[2]
    assert len(serving.engine.session_prompts[42]) == 2
    assert serving.engine.ended_sessions[-1] == 42 and 42 not in serving.engine.sessions


def test_webui_chat_stream(server):
    url, _ = server
    messages = history_to_messages([{"role": "user", "content": "a"},
                                    {"role": "assistant", "content": "b"}], "tell me")
    assert messages[-1] == {"role": "user", "content": "tell me"} and len(messages) == 3
    parts = list(chat_stream(url, MESSAGES, model=MODEL_ID, api_key="sk-test",
                             max_tokens=7, temperature=0))
    assert len(parts[-1]) == 7 and all(parts[-1].startswith(p) for p in parts)


def test_webui_without_gradio_says_how_to_install(monkeypatch):
    import sys

    from tpserve.cluster.webui import run_webui
    from tpserve.engine.errors import ConfigError

    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio -> ImportError
    with pytest.raises(ConfigError, match=r"tpserve\[webui\]"):
        run_webui("http://127.0.0.1:1")


def test_api_client_names_an_unreachable_server():
    from tpserve.cluster.local_server import free_port
    from tpserve.engine.errors import ConfigError

    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ConfigError, match="cannot reach"):
        api_client_repl(url, input_fn=lambda _: "exit")
