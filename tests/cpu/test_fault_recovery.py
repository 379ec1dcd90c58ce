"""Fault recovery: an engine that dies mid-stream fails its requests at once (an SSE
error event, a 503), the serving engine rebuilds it in the background, and the next
request succeeds. First over a fake engine (each path of the rebuild), then for real:
a tensor-parallel worker (tp=2, Ray actors) killed mid-stream; the answer after the
rebuild equals the greedy answer from before, and no KV blocks stay in use."""
from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
import ray
from conftest import ENGINE_OPTIONS, local_ray
from starlette.testclient import TestClient

from api_fakes import MODEL_ID, ByteTokenizer, FakeAsyncEngine, FakeChatTemplate
from tpserve.cluster.deployment import llm_engine_factory
from tpserve.cluster.local_server import BackgroundServer
from tpserve.cluster.openai_api import build_api_app
from tpserve.cluster.serve_config import ServeConfig
from tpserve.cluster.serving_engine import ServingEngine
from tpserve.engine.async_engine import EngineDeadError

PROMPT = "The quick brown fox"
LONG = {"prompt": PROMPT, "max_tokens": 400, "temperature": 0, "ignore_eos": True}


class MortalEngine(FakeAsyncEngine):
    """The fake engine, which dies (as AsyncLLMEngine does: is_running goes False) after
    `die_after` tokens of any request."""

    def __init__(self, die_after: int | None = None) -> None:
        super().__init__(ByteTokenizer())
        self.die_after = die_after
        self.is_running = True

    async def generate(self, *args, **kwargs):
        if not self.is_running:
            raise EngineDeadError("the engine is not running")
        tokens = 0
        async for out in super().generate(*args, **kwargs):
            if tokens == self.die_after:
                self.is_running, self.dead = False, True
                raise EngineDeadError("the engine loop failed: rank 1 died")
            tokens += len(out.delta_token_ids)
            yield out


class Rebuilder:
    """A `rebuild` that counts its calls and can fail or be slow."""

    def __init__(self, fail: bool = False, delay: float = 0.0) -> None:
        self.fail, self.delay, self.calls = fail, delay, 0

    def __call__(self) -> MortalEngine:
        self.calls += 1
        time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("no GPU left for the new workers")
        return MortalEngine()


def mortal_serving(rebuild: Rebuilder | None, die_after: int | None = 5,
                   restart_wait_s: float = 30) -> ServingEngine:
    return ServingEngine(MortalEngine(die_after), ByteTokenizer(), FakeChatTemplate(), MODEL_ID,
                         512, rebuild=rebuild, restart_wait_s=restart_wait_s)


def sse(text: str) -> list[dict]:
    events = [e[6:] for e in text.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_fake_engine_death_fails_the_stream_then_a_rebuild_serves():
    rebuild = Rebuilder()
    serving = mortal_serving(rebuild)
    with TestClient(build_api_app(serving)) as client:
        body = {"prompt": "hi", "max_tokens": 20, "temperature": 0}
        events = sse(client.post("/v1/completions", json={**body, "stream": True}).text)
        streamed = "".join(e["choices"][0]["text"] for e in events[:-1])
        assert len(streamed) == 5  # one byte a token, up to the death
        error = events[-1]["error"]
        assert error["type"] == "service_unavailable" and error["code"] == "engine_restarting"
        whole = client.post("/v1/completions", json=body)  # waits for the rebuild
        assert whole.status_code == 200, whole.text
        assert whole.json()["choices"][0]["text"].startswith(streamed)
        assert rebuild.calls == 1 and serving.restarts == 1
        assert client.get("/health").status_code == 200


def test_fake_non_streamed_request_gets_503_and_health_stays_up():
    serving = mortal_serving(Rebuilder())
    with TestClient(build_api_app(serving)) as client:
        r = client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20})
        assert r.status_code == 503 and "workers died" in r.json()["error"]["message"]
        assert r.headers["retry-after"] == "5"
        assert client.get("/health").status_code == 200


def test_failed_rebuild_is_unhealthy_and_retried_by_the_next_request():
    rebuild = Rebuilder(fail=True)
    serving = mortal_serving(rebuild)
    with TestClient(build_api_app(serving)) as client:
        body = {"prompt": "hi", "max_tokens": 20}
        assert client.post("/v1/completions", json=body).status_code == 503
        r = client.post("/v1/completions", json=body)  # the rebuild failed: 503 saying so
        assert r.status_code == 503 and "restarting them failed" in r.json()["error"]["message"]
        assert client.get("/health").status_code == 503  # Ray Serve replaces the replica
        rebuild.fail = False
        assert client.post("/v1/completions", json=body).status_code == 200
        assert client.get("/health").status_code == 200 and serving.restarts == 1


def test_slow_rebuild_answers_503_after_the_wait():
    serving = mortal_serving(Rebuilder(delay=1.0), restart_wait_s=0.1)
    with TestClient(build_api_app(serving)) as client:
        body = {"prompt": "hi", "max_tokens": 20}
        assert client.post("/v1/completions", json=body).status_code == 503
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 503 and "are restarting" in r.json()["error"]["message"]
        assert client.get("/health").status_code == 200  # rebuilding is not a reason to replace
        time.sleep(1.2)
        assert client.post("/v1/completions", json=body).status_code == 200


def test_without_rebuild_a_dead_engine_stays_dead():
    serving = mortal_serving(None)
    with TestClient(build_api_app(serving)) as client:
        body = {"prompt": "hi", "max_tokens": 20}
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 503 and "must be restarted" in r.json()["error"]["message"]
        assert client.get("/health").status_code == 503


# ---- for real: tp=2 on Ray ---------------------------------------------------
@pytest.fixture(scope="module")
def ray_cluster():
    with local_ray(4):  # two ranks, and two more while rebuilding
        yield


@pytest.fixture(scope="module")
def served(ray_cluster, tiny_workspace):
    """The REST app over a tp=2 engine (ranks as Ray actors) on a local uvicorn."""
    config = ServeConfig(model=str(tiny_workspace("llama", 2)), tp=2, instance_num=4,
                         engine_options=dict(ENGINE_OPTIONS))
    serving = llm_engine_factory(config)
    try:
        with BackgroundServer(build_api_app(serving, shutdown_engine=True)) as url:
            yield url, serving
    finally:
        serving.rebuild.llm.shutdown()


def _metrics(url: str) -> dict[str, float]:
    lines = httpx.get(url + "/metrics", timeout=30).text.splitlines()
    return {l.split("{")[0]: float(l.rsplit(" ", 1)[1]) for l in lines
            if l.startswith(("tpserve:num_requests_running", "tpserve:kv_cache_usage_perc"))}


def _wait_running(url: str, n: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while _metrics(url)["tpserve:num_requests_running"] < n:
        assert time.monotonic() < deadline, f"{n} requests never ran at once"
        time.sleep(0.02)


def _complete(url: str, **body) -> httpx.Response:
    return httpx.post(url + "/v1/completions", json={**LONG, **body}, timeout=120)


@pytest.mark.slow
def test_killed_worker_fails_requests_then_server_recovers(served):
    url, serving = served
    healthy = _complete(url, max_tokens=24)
    assert healthy.status_code == 200, healthy.text
    reference = healthy.json()["choices"][0]["text"]
    executor = serving.rebuild.llm.executor
    assert executor.tp == 2 and len(executor.workers) == 2

    whole: dict[str, httpx.Response] = {}  # a non-streamed request in flight too
    other = threading.Thread(target=lambda: whole.update(r=_complete(url)))
    other.start()
    events, killed_at = [], None
    with httpx.stream("POST", url + "/v1/completions", json={**LONG, "stream": True},
                      timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            events.append(line[6:])
            if len(events) == 3:
                _wait_running(url, 2)
                killed_at = time.monotonic()
                ray.kill(executor.workers[1], no_restart=True)
    ended_after = time.monotonic() - killed_at
    other.join(timeout=60)

    assert ended_after < 30, f"the stream took {ended_after:.1f} s to end after the kill"
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "service_unavailable" and "workers died" in error["message"]
    finish = [json.loads(e)["choices"][0]["finish_reason"] for e in events[:-2]]
    assert finish.count(None) == len(finish)  # cut short, not finished
    assert whole["r"].status_code == 503 and "restarting" in whole["r"].json()["error"]["message"]

    again = _complete(url, max_tokens=24)  # waits for the rebuild when it is still running
    assert again.status_code == 200, again.text
    assert again.json()["choices"][0]["text"] == reference
    assert serving.restarts == 1 and serving.rebuild.llm.executor is not executor
    assert httpx.get(url + "/health", timeout=30).status_code == 200
    metrics = _metrics(url)
    assert metrics["tpserve:num_requests_running"] == 0
    assert metrics["tpserve:kv_cache_usage_perc"] == 0
