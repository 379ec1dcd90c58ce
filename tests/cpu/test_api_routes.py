"""The REST app in-process (starlette TestClient) over the fake engine."""
from __future__ import annotations

import json

import pytest
from starlette.testclient import TestClient

from api_fakes import MODEL_ID, TEXT, make_serving
from tpserve.cluster.openai_api import APIOptions, build_api_app

CHAT = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 12,
        "temperature": 0}


@pytest.fixture
def serving():
    return make_serving(session_len=256)


@pytest.fixture
def client(serving):
    return TestClient(build_api_app(serving))


def sse_events(text: str) -> list:
    assert text.endswith("data: [DONE]\n\n")
    events = [e for e in text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    return [json.loads(e[6:]) for e in events[:-1]]


def assert_openai_error(response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param
    return err


def test_models(client):
    data = client.get("/v1/models").json()
    assert data["object"] == "list"
    assert data["data"][0]["id"] == MODEL_ID and data["data"][0]["object"] == "model"


def test_chat_stream_matches_non_stream(client):
    whole = client.post("/v1/chat/completions", json=CHAT).json()
    choice = whole["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "length"
    assert whole["usage"]["completion_tokens"] == 12
    assert whole["usage"]["total_tokens"] == whole["usage"]["prompt_tokens"] + 12
    events = sse_events(client.post("/v1/chat/completions", json={
        **CHAT, "stream": True, "stream_options": {"include_usage": True}}).text)
    assert len({e["id"] for e in events}) == 1 and len({e["created"] for e in events}) == 1
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(e["usage"] is None for e in events[:-1])
    assert events[-1]["choices"] == [] and events[-1]["usage"] == whole["usage"]
    streamed = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert streamed == choice["message"]["content"]
    assert events[-2]["choices"][0]["finish_reason"] == "length"


def test_chat_stream_without_usage_has_no_usage_field(client):
    events = sse_events(client.post("/v1/chat/completions", json={**CHAT, "stream": True}).text)
    assert all("usage" not in e for e in events)


def test_max_completion_tokens_stop_and_n(client, serving):
    r = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": None,
                                                  "max_completion_tokens": 5, "n": 3}).json()
    assert [c["index"] for c in r["choices"]] == [0, 1, 2]
    assert all(len(c["message"]["content"]) == 5 for c in r["choices"])
    assert r["usage"]["completion_tokens"] == 15
    text = r["choices"][0]["message"]["content"]
    stop_at = text[2]
    r = client.post("/v1/chat/completions", json={**CHAT, "stop": [stop_at]}).json()
    assert r["choices"][0]["message"]["content"] == text[:text.index(stop_at)]
    assert r["choices"][0]["finish_reason"] == "stop"


def test_sampling_fields_reach_engine(client, serving):
    body = {**CHAT, "temperature": 0.7, "top_p": 0.9, "top_k": 5, "min_p": 0.1, "seed": 7,
            "repetition_penalty": 1.1, "presence_penalty": 0.5, "frequency_penalty": -0.5,
            "ignore_eos": True, "stop": "zz", "max_tokens": 50}
    r = client.post("/v1/chat/completions", json=body).json()
    assert r["choices"][0]["finish_reason"] == "length"  # ignore_eos: past the fake EOS at 40
    (prompt, params), = serving.engine.requests.values()
    assert (params.temperature, params.top_p, params.top_k, params.min_p, params.seed) == (0.7, 0.9, 5, 0.1, 7)
    assert (params.repetition_penalty, params.presence_penalty, params.frequency_penalty) == (1.1, 0.5, -0.5)
    assert params.ignore_eos and params.stop == ["zz"] and params.max_tokens == 50


def test_chat_logprobs(client):
    r = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 3, "logprobs": True,
                                                  "top_logprobs": 2}).json()
    content = r["choices"][0]["logprobs"]["content"]
    assert len(content) == 3 and len(content[0]["top_logprobs"]) == 2
    assert "".join(c["token"] for c in content) == r["choices"][0]["message"]["content"]
    assert content[0]["bytes"] == list(content[0]["token"].encode())


def test_completions(client):
    body = {"model": MODEL_ID, "prompt": "once upon", "max_tokens": 6, "temperature": 0, "logprobs": 1}
    whole = client.post("/v1/completions", json=body).json()
    choice = whole["choices"][0]
    assert whole["object"] == "text_completion" and len(choice["text"]) == 6
    assert choice["logprobs"]["tokens"] == list(choice["text"])
    assert choice["logprobs"]["text_offset"] == list(range(6))
    events = sse_events(client.post("/v1/completions", json={**body, "stream": True}).text)
    assert "".join(e["choices"][0]["text"] for e in events) == choice["text"]
    batch = client.post("/v1/completions", json={**body, "prompt": ["a", "b"], "n": 2}).json()
    assert [c["index"] for c in batch["choices"]] == [0, 1, 2, 3]
    ids = client.post("/v1/completions", json={**body, "prompt": [256, 70, 71]}).json()
    assert ids["usage"]["prompt_tokens"] == 3


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    (b"", 400, None),
    (json.dumps({**CHAT, "max_tokens": -1}).encode(), 400, "max_tokens"),
    (json.dumps({**CHAT, "max_tokens": "12"}).encode(), 400, "max_tokens"),
    (json.dumps({**CHAT, "messages": "hi"}).encode(), 400, "messages"),
    (json.dumps({**CHAT, "temperature": -1}).encode(), 400, "temperature"),
    (json.dumps({**CHAT, "model": "gpt-4"}).encode(), 404, "model"),
    (json.dumps({**CHAT, "messages": [{"role": "user", "content": "x" * 300}]}).encode(), 400, "messages"),
])
def test_bad_chat_requests(client, body, status, param):
    err = assert_openai_error(client.post("/v1/chat/completions", content=body), status, param)
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 200  # still serving
    if status == 400 and "x" * 10 in body.decode():
        assert err["code"] == "context_length_exceeded"


def test_rejected_completion_fields(client):
    for extra in ({"echo": True}, {"suffix": "z"}, {"prompt": []}):
        body = {"model": MODEL_ID, "prompt": "hi", **extra}
        assert "not supported" in assert_openai_error(
            client.post("/v1/completions", json=body), 400)["message"] or extra == {"prompt": []}


def test_body_limit_and_unknown_route():
    client = TestClient(build_api_app(make_serving(), APIOptions(max_body_bytes=1000)))
    assert_openai_error(client.post("/v1/completions", content=b"x" * 2000), 413)

    def chunks():
        for _ in range(5):
            yield b"x" * 400

    assert_openai_error(client.post("/v1/completions", content=chunks()), 413)
    assert_openai_error(client.get("/v1/nothing"), 404)
    assert client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200


def test_api_keys():
    client = TestClient(build_api_app(make_serving(), APIOptions(api_keys=("k1", "k2"))))
    assert client.get("/health").status_code == 200
    assert_openai_error(client.get("/v1/models"), 401)
    assert_openai_error(client.get("/v1/models", headers={"Authorization": "Bearer nope"}), 401)
    assert_openai_error(client.get("/metrics"), 401)
    assert client.get("/v1/models", headers={"Authorization": "Bearer k2"}).status_code == 200


def test_cors_off_by_default_and_on_when_asked():
    plain = TestClient(build_api_app(make_serving()))
    assert "access-control-allow-origin" not in plain.get("/v1/models", headers={"Origin": "http://a"}).headers
    cors = TestClient(build_api_app(make_serving(), APIOptions(allow_origins=("http://a",))))
    r = cors.options("/v1/chat/completions", headers={
        "Origin": "http://a", "Access-Control-Request-Method": "POST"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://a"


def test_health_reports_dead_engine(client, serving):
    assert client.get("/health").status_code == 200
    serving.engine.dead = True
    assert_openai_error(client.get("/health"), 503)


def test_metrics_names(client, serving):
    client.post("/v1/chat/completions", json=CHAT)
    text = client.get("/metrics").text
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc",
                 "prompt_tokens_total", "generation_tokens_total", "time_to_first_token_seconds",
                 "inter_token_latency_seconds", "e2e_request_latency_seconds"):
        assert f"tpserve:{name}" in text, name
    assert f'tpserve:generation_tokens_total{{model_name="{MODEL_ID}"}} 12.0' in text
    preemptions = f'tpserve:num_preemptions_total{{model_name="{MODEL_ID}"}}'
    assert f"{preemptions} 0.0" in text and "tpserve:num_session_evictions_total" in text
    serving.engine.num_preemptions = 3  # the engine's running total: the counter follows it
    client.get("/metrics")
    serving.engine.num_preemptions = 5
    assert f"{preemptions} 5.0" in client.get("/metrics").text


def test_encode(client):
    r = client.post("/v1/encode", json={"input": "ab"}).json()
    assert r["length"] == 3 and r["input_ids"][0] == 256  # BOS first
    r = client.post("/v1/encode", json={"input": ["ab", "c"], "add_bos": False}).json()
    assert r["length"] == [2, 1]
    for add_bos in (False, True):  # the template writes the BOS; it is never doubled
        r = client.post("/v1/encode", json={"input": "ab", "do_preprocess": True, "add_bos": add_bos}).json()
        assert r["length"] == 1 + len("<|user|>ab\n<|assistant|>") and r["input_ids"][:2] != [256, 256]


def test_interactive_session_keep_and_end(client, serving):
    base = {"session_id": 7, "interactive_mode": True, "request_output_len": 6, "temperature": 0}
    lines = [json.loads(x) for x in client.post("/v1/chat/interactive", json={
        **base, "prompt": "hi", "stream": True}).text.splitlines()]
    first = "".join(x["text"] for x in lines)
    assert lines[-1]["finish_reason"] == "length" and lines[-1]["tokens"] == 6
    second = client.post("/v1/chat/interactive", json={**base, "prompt": "more"}).json()
    assert second["tokens"] == 6 and second["finish_reason"] == "length"
    turn1, turn2 = serving.engine.session_prompts[7]
    tok = serving.tokenizer
    assert tok.decode(turn1) == "<|user|>hi\n<|assistant|>"
    # the second call sends only what follows the cached text (no BOS, no first turn)
    assert tok.decode(turn2, skip_special_tokens=False) == "\n<|user|>more\n<|assistant|>"
    assert serving.engine.sessions[7] == len(turn1) + len(turn2) + 12
    assert first
    end = client.post("/v1/chat/interactive", json={"prompt": "", "session_id": 7,
                                                   "interactive_mode": False, "request_output_len": 0})
    assert end.status_code == 200 and 7 not in serving.engine.sessions
    assert serving.engine.ended_sessions == [7]
    client.post("/v1/chat/interactive", json={**base, "prompt": "new"})
    assert serving.tokenizer.decode(serving.engine.session_prompts[7][-1]) == "<|user|>new\n<|assistant|>"


def test_interactive_session_after_engine_rebuild_resends_history(client, serving):
    """A rebuilt engine lost the session's KV: the next turn sends the whole conversation."""
    base = {"session_id": 11, "interactive_mode": True, "request_output_len": 4, "temperature": 0}
    first = client.post("/v1/chat/interactive", json={**base, "prompt": "hi"}).json()["text"]
    serving.restarts += 1  # as ServingEngine does after rebuilding a dead engine
    serving.engine.sessions.pop(11, None)  # the new engine holds nothing
    client.post("/v1/chat/interactive", json={**base, "prompt": "more"})
    turn2 = serving.engine.session_prompts[11][-1]
    assert serving.tokenizer.decode(turn2) == serving.tokenizer.decode(serving.encode(
        serving.render_chat([{"role": "user", "content": "hi"},
                             {"role": "assistant", "content": first},
                             {"role": "user", "content": "more"}]), add_bos=False))
    client.post("/v1/chat/interactive", json={**base, "prompt": "again"})
    turn3 = serving.tokenizer.decode(serving.engine.session_prompts[11][-1],
                                     skip_special_tokens=False)
    assert turn3 == "\n<|user|>again\n<|assistant|>"  # back to sending only the new turn


def test_interactive_session_full_is_400(client):
    base = {"session_id": 9, "interactive_mode": True, "request_output_len": 100}
    client.post("/v1/chat/interactive", json={**base, "prompt": "a" * 80, "ignore_eos": True})
    err = assert_openai_error(client.post("/v1/chat/interactive", json={**base, "prompt": "b" * 80}), 400)
    assert err["code"] == "context_length_exceeded"


def test_engine_request_error_is_400(client, serving):
    serving.max_model_len = 10_000  # the server lets it through; the engine refuses
    r = client.post("/v1/completions", json={"prompt": "x" * 300, "stream": True})
    assert_openai_error(r, 400)
    assert TEXT  # the fake's text is importable
