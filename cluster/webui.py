"""`tpserve serve gradio`: a web chat page streaming from /v1/chat/completions.

In front of a running server (a URL), or of a local model: then the REST app is
started in this process on a free loopback port and the page talks to it.
Gradio is the optional extra `webui` (`pip install 'tpserve[webui]'`); this
module imports it only inside `build_webui`, so the rest works without it.
"""
from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from typing import Any, Iterator

import httpx

from tpserve.engine.errors import ConfigError, RequestError, TpserveError

INSTALL_HINT = "the web UI needs gradio 5.50 or newer: pip install 'tpserve[webui]'"
ERROR_MARK = "⚠️ "  # starts an assistant bubble that shows an error, not a reply


@dataclass(frozen=True)
class GenerationDefaults:
    """Where the page's generation sliders start."""

    max_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 0.95


def _error_message(response: httpx.Response) -> str:
    try:
        return f"HTTP {response.status_code}: {response.json()['error']['message']}"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}: {response.text[:300]}"


def chat_stream(url: str, messages: list[dict], model: str | None = None,
                api_key: str | None = None, timeout: float = 600.0, **sampling: Any) -> Iterator[str]:
    """The assistant's reply so far, growing with each streamed chunk.

    Raises ConfigError when the server cannot be reached and RequestError when it
    refuses the request or the stream breaks off.
    """
    body = {"messages": messages, "stream": True, **sampling}
    if model:
        body["model"] = model
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    text = ""
    try:
        with httpx.stream("POST", url.rstrip("/") + "/v1/chat/completions", json=body,
                          headers=headers, timeout=timeout) as response:
            if response.status_code != 200:
                response.read()
                raise RequestError(_error_message(response))
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: "):])
                if "error" in chunk:
                    raise RequestError(chunk["error"].get("message", str(chunk)))
                for choice in chunk.get("choices", []):
                    text += choice["delta"].get("content") or ""
                yield text
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        raise ConfigError(f"cannot reach {url} ({exc}); start a server with `tpserve serve "
                          f"api_server` or check the URL") from None
    except httpx.HTTPError as exc:
        raise RequestError(f"the stream from {url} broke off: {exc!r}") from None


def _text_of(content: Any) -> str:
    """A message's text: a string (gradio 4/5) or a list of typed parts (gradio 6)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""  # a file or component: nothing the chat endpoint can take


def history_to_messages(history: list, message: str) -> list[dict]:
    """Gradio's history (message dicts, or [user, bot] pairs in old versions) plus the new turn.

    A turn whose reply was an error is left out, so the model never sees it.
    """
    messages: list[dict] = []
    for item in history:
        if isinstance(item, dict):
            role, text = item["role"], _text_of(item["content"])
            if role == "assistant" and text.startswith(ERROR_MARK):
                if messages and messages[-1]["role"] == "user":
                    messages.pop()
                continue
            messages.append({"role": role, "content": text})
        else:
            user, bot = item
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": bot or ""}]
    return messages + [{"role": "user", "content": message}]


def reply_turns(url: str, history: list, message: str, model: str | None = None,
                api_key: str | None = None, **sampling: Any) -> Iterator[list[dict]]:
    """The chat after the new turn, once per streamed chunk; errors end it as an error bubble."""
    turns = list(history) + [{"role": "user", "content": message}]
    text = ""
    yield turns + [{"role": "assistant", "content": ""}]
    try:
        for text in chat_stream(url, history_to_messages(history, message), model=model,
                                api_key=api_key, **sampling):
            yield turns + [{"role": "assistant", "content": text}]
    except TpserveError as exc:
        shown = f"{ERROR_MARK}error: {exc}" + (f"\n\n(partial reply: {text})" if text else "")
        yield turns + [{"role": "assistant", "content": shown}]


def _messages_kwargs(component: Any) -> dict:
    """`type="messages"` where the component still has tuples as an option (gradio < 6)."""
    return {"type": "messages"} if "type" in inspect.signature(component).parameters else {}


def _import_gradio():
    try:
        import gradio
    except ImportError as exc:  # missing, or an installed gradio too old for its dependencies
        raise ConfigError(f"{INSTALL_HINT} ({exc})") from None
    return gradio


def build_webui(url: str, model: str | None = None, api_key: str | None = None,
                defaults: GenerationDefaults = GenerationDefaults(), title: str = "tpserve chat"):
    """The page (a `gradio.Blocks`) for the server at `url`; launch it with `.queue().launch()`."""
    gr = _import_gradio()

    def respond(message: str, history: list, max_tokens: float, temperature: float,
                top_p: float) -> Iterator[tuple[list[dict], str]]:
        if not message.strip():
            yield history, message
            return
        sampling = {"max_tokens": int(max_tokens), "temperature": float(temperature),
                    "top_p": float(top_p)}
        for turns in reply_turns(url, history, message, model=model, api_key=api_key, **sampling):
            yield turns, ""

    with gr.Blocks(title=title, analytics_enabled=False) as page:
        gr.Markdown(f"### {title}\ntalking to `{url}`" + (f" (model `{model}`)" if model else ""))
        chatbot = gr.Chatbot(label="chat", elem_id="tpserve-chatbot", height=480,
                             **_messages_kwargs(gr.Chatbot))
        with gr.Row():
            textbox = gr.Textbox(placeholder="Type a message and press Enter", show_label=False,
                                 elem_id="tpserve-input", scale=8, autofocus=True)
            send = gr.Button("Send", variant="primary", elem_id="tpserve-send", scale=1)
            clear = gr.Button("Clear", elem_id="tpserve-clear", scale=1)
        with gr.Accordion("Generation settings", open=False):
            max_tokens = gr.Slider(1, 4096, value=defaults.max_tokens, step=1, label="max tokens")
            temperature = gr.Slider(0.0, 2.0, value=defaults.temperature, step=0.05,
                                    label="temperature (0 = greedy)")
            top_p = gr.Slider(0.01, 1.0, value=defaults.top_p, step=0.01, label="top p")
        inputs = [textbox, chatbot, max_tokens, temperature, top_p]
        reply = gr.on([textbox.submit, send.click], respond, inputs, [chatbot, textbox],
                      api_name="chat", show_progress="hidden")
        clear.click(lambda: ([], ""), None, [chatbot, textbox], cancels=[reply], queue=False)
    return page


def _start_local_server(model: str | None, tp: int | None, model_name: str | None) -> tuple[str, Any]:
    from .deployment import llm_engine_factory
    from .local_server import BackgroundServer
    from .openai_api import build_api_app
    from .serve_config import ServeConfig

    serving = llm_engine_factory(ServeConfig(model=model, tp=tp, model_name=model_name))
    server = BackgroundServer(build_api_app(serving, shutdown_engine=True))
    return server.start(), server


def run_webui(url_or_model: str | None, server_name: str = "127.0.0.1", server_port: int = 6006,
              restful_api: bool | None = None, tp: int | None = None, model_name: str | None = None,
              api_key: str | None = None) -> None:
    """Serve the page until Ctrl-C; a model path (not a URL) is served in this process first,
    and None serves the bundled demo model."""
    _import_gradio()  # fail before loading a model
    is_url = (url_or_model or "").startswith(("http://", "https://")) \
        if restful_api is None else restful_api
    local = None
    url = url_or_model
    if is_url and not url:
        raise ConfigError("--restful-api True needs the server's URL, e.g. "
                          "tpserve serve gradio http://127.0.0.1:23333")
    if not is_url:
        url, local = _start_local_server(url_or_model, tp, model_name)
    try:
        page = build_webui(url, model=model_name, api_key=api_key)
        print(f"tpserve: web chat for {url_or_model or 'the demo model'} at http://{server_name}:{server_port}",
              flush=True)
        page.queue().launch(server_name=server_name, server_port=server_port, quiet=True)
    finally:
        if local is not None:
            local.stop()
