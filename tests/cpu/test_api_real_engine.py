"""The REST app over the real engine (the bundled demo model, CPU): greedy streams equal
whole answers, and a client that disconnects leaves no KV blocks in use."""
from __future__ import annotations

import time

import httpx
import openai
import pytest

from tpserve.cluster.deployment import llm_engine_factory
from tpserve.cluster.local_server import BackgroundServer
from tpserve.cluster.openai_api import build_api_app
from tpserve.cluster.serve_config import ServeConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served():
    config = ServeConfig(model=None, instance_num=8,
                         engine_options={"session_len": 256, "cache_max_entry_count": 32})
    serving = llm_engine_factory(config)
    with BackgroundServer(build_api_app(serving, shutdown_engine=True)) as url:
        yield url, serving


def _stats(url: str) -> dict:
    lines = httpx.get(url + "/metrics").text.splitlines()
    return {l.split("{")[0]: float(l.rsplit(" ", 1)[1]) for l in lines
            if l.startswith(("tpserve:num_requests_running", "tpserve:kv_cache_usage_perc"))}


def test_real_engine_stream_equals_whole(served):
    url, serving = served
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    assert client.models.list().data[0].id == serving.model_id == "tpserve-demo"
    kwargs = dict(model=serving.model_id, messages=[{"role": "user", "content": "Who art thou?"}],
                  max_tokens=6, temperature=0)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_real_engine_disconnect_frees_kv(served):
    url, serving = served
    body = {"model": serving.model_id, "prompt": "In the beginning", "max_tokens": 200,
            "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=120) as c:
        with c.stream("POST", url + "/v1/completions", json=body) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i >= 3:
                    assert _stats(url)["tpserve:num_requests_running"] == 1
                    break  # closes the connection
    deadline = time.monotonic() + 30
    while _stats(url)["tpserve:num_requests_running"] and time.monotonic() < deadline:
        time.sleep(0.1)
    stats = _stats(url)
    assert stats["tpserve:num_requests_running"] == 0 and stats["tpserve:kv_cache_usage_perc"] == 0


def test_real_engine_interactive_session(served):
    url, serving = served
    base = {"session_id": 5, "interactive_mode": True, "request_output_len": 8, "temperature": 0}
    first = httpx.post(url + "/v1/chat/interactive", json={**base, "prompt": "Hello"}, timeout=120)
    assert first.status_code == 200 and first.json()["tokens"] > 0
    second = httpx.post(url + "/v1/chat/interactive", json={**base, "prompt": "And then?"}, timeout=120)
    assert second.status_code == 200 and second.json()["tokens"] > 0
    end = httpx.post(url + "/v1/chat/interactive", json={"prompt": "", "session_id": 5,
                                                         "interactive_mode": False,
                                                         "request_output_len": 0}, timeout=120)
    assert end.status_code == 200
    stats = _stats(url)
    assert stats["tpserve:num_requests_running"] == 0 and stats["tpserve:kv_cache_usage_perc"] == 0


def test_dead_engine_is_503():
    from starlette.testclient import TestClient

    from tpserve.engine.async_engine import EngineDeadError

    from api_fakes import make_serving

    serving = make_serving()

    async def dead(*args, **kwargs):
        raise EngineDeadError("the engine loop failed")
        yield  # an async generator, as the engine's

    serving.engine.generate = dead
    r = TestClient(build_api_app(serving)).post("/v1/completions", json={"prompt": "hi"})
    assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
