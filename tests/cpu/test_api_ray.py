"""Ray Serve smoke test: the deployment on a local Ray (2 CPUs) answers over HTTP."""
from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest

from api_fakes import MODEL_ID
from tpserve.cluster.local_server import free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_serve_url():
    ray = pytest.importorskip("ray")
    from ray import serve

    from tpserve.cluster.app import build_app

    here = str(Path(__file__).resolve().parent)
    path = os.pathsep.join([here] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": path}})
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app({"model": "fake", "device": "cpu", "api_keys": "sk-ray",
                         "engine_factory": "api_fakes:serving_factory", "token_delay": "0.002", "session_len": "100000"})
        serve.run(app, name="tpserve", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_ray_serve_answers(ray_serve_url):
    headers = {"Authorization": "Bearer sk-ray"}
    assert httpx.get(ray_serve_url + "/health", timeout=30).status_code == 200
    models = httpx.get(ray_serve_url + "/v1/models", headers=headers, timeout=30).json()
    assert models["data"][0]["id"] == MODEL_ID
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 9,
            "temperature": 0}
    whole = httpx.post(ray_serve_url + "/v1/chat/completions", json=body, headers=headers, timeout=30)
    assert whole.status_code == 200, whole.text
    text = whole.json()["choices"][0]["message"]["content"]
    streamed = ""
    with httpx.stream("POST", ray_serve_url + "/v1/chat/completions", json={**body, "stream": True},
                      headers=headers, timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: {"):
                streamed += json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
    assert streamed == text and len(text) == 9
    bad = httpx.post(ray_serve_url + "/v1/chat/completions", json={**body, "model": "x"},
                     headers=headers, timeout=30)
    assert bad.status_code == 404 and bad.json()["error"]["code"] == "model_not_found"
    assert httpx.get(ray_serve_url + "/v1/models", timeout=30).status_code == 401


def _running(client: httpx.Client, url: str) -> float:
    text = client.get(url + "/metrics").text
    line = next(l for l in text.splitlines() if l.startswith("tpserve:num_requests_running{"))
    return float(line.rsplit(" ", 1)[1])


def test_ray_serve_disconnect_aborts(ray_serve_url):
    import time

    client = httpx.Client(headers={"Authorization": "Bearer sk-ray"}, timeout=30)
    body = {"model": MODEL_ID, "prompt": "go", "max_tokens": 20000, "ignore_eos": True, "stream": True}
    with httpx.Client(headers=client.headers, timeout=30) as streamer:
        with streamer.stream("POST", ray_serve_url + "/v1/completions", json=body) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i > 5:
                    assert _running(client, ray_serve_url) == 1
                    break  # closes the connection
    deadline = time.monotonic() + 10  # unaborted, the request would run for 40 s or more
    while _running(client, ray_serve_url) != 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _running(client, ray_serve_url) == 0
