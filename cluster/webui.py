"""`tpserve serve gradio`: a web chat page streaming from /v1/chat/completions.

In front of a running server (a URL), or of a local model: then the REST app is
started in this process on a free loopback port and the page talks to it.
Gradio is the optional extra `webui` (`pip install 'tpserve[webui]'`).
"""
from __future__ import annotations

import json
from typing import Any, Iterator

import httpx

from tpserve.engine.errors import ConfigError


def chat_stream(url: str, messages: list[dict], model: str | None = None,
                api_key: str | None = None, timeout: float = 600.0, **sampling: Any) -> Iterator[str]:
    """The assistant's reply so far, growing with each streamed chunk."""
    body = {"messages": messages, "stream": True, **sampling}
    if model:
        body["model"] = model
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    text = ""
    with httpx.stream("POST", url.rstrip("/") + "/v1/chat/completions", json=body,
                      headers=headers, timeout=timeout) as response:
        if response.status_code != 200:
            response.read()
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:300]}")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                raise RuntimeError(chunk["error"].get("message", str(chunk)))
            for choice in chunk.get("choices", []):
                text += choice["delta"].get("content") or ""
            yield text


def history_to_messages(history: list, message: str) -> list[dict]:
    """Gradio's history (message dicts, or [user, bot] pairs in old versions) plus the new turn."""
    messages: list[dict] = []
    for item in history:
        if isinstance(item, dict):
            messages.append({"role": item["role"], "content": item["content"]})
        else:
            user, bot = item
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": bot or ""}]
    return messages + [{"role": "user", "content": message}]


def _start_local_server(model: str, tp: int, model_name: str | None) -> tuple[str, Any]:
    from .deployment import llm_engine_factory
    from .local_server import BackgroundServer
    from .openai_api import build_api_app
    from .serve_config import ServeConfig

    serving = llm_engine_factory(ServeConfig(model=model, tp=tp, model_name=model_name))
    server = BackgroundServer(build_api_app(serving, shutdown_engine=True))
    return server.start(), server


def run_webui(url_or_model: str, server_name: str = "127.0.0.1", server_port: int = 6006,
              restful_api: bool | None = None, tp: int = 1, model_name: str | None = None,
              api_key: str | None = None) -> None:
    try:
        import gradio as gr
    except ImportError:
        raise ConfigError("the web UI needs gradio: pip install 'tpserve[webui]'") from None
    is_url = url_or_model.startswith(("http://", "https://")) if restful_api is None else restful_api
    local = None
    url = url_or_model
    if not is_url:
        url, local = _start_local_server(url_or_model, tp, model_name)

    def respond(message: str, history: list) -> Iterator[str]:
        yield from chat_stream(url, history_to_messages(history, message), model=model_name,
                               api_key=api_key)

    try:
        kwargs = {"title": "tpserve chat", "description": f"talking to {url_or_model}"}
        try:
            demo = gr.ChatInterface(respond, type="messages", **kwargs)
        except TypeError:  # gradio >= 6 has only the messages format
            demo = gr.ChatInterface(respond, **kwargs)
        demo.queue().launch(server_name=server_name, server_port=server_port)
    finally:
        if local is not None:
            local.stop()
