"""Clients of the REST server: the `api_client` terminal REPL over /v1/chat/interactive.

The server keeps the session's KV cache between turns; typing `end` ends the
session (the next prompt starts a fresh conversation), `exit` quits.
"""
from __future__ import annotations

import json
import sys
from typing import Callable, Iterator, TextIO

import httpx


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def stream_interactive(url: str, prompt: str, session_id: int, *, interactive_mode: bool = True,
                       request_output_len: int = 512, api_key: str | None = None,
                       timeout: float = 600.0, **sampling) -> Iterator[dict]:
    """Yields the server's `{"text", "tokens", "finish_reason"}` lines for one turn."""
    body = {"prompt": prompt, "session_id": session_id, "interactive_mode": interactive_mode,
            "stream": True, "request_output_len": request_output_len, **sampling}
    with httpx.stream("POST", url.rstrip("/") + "/v1/chat/interactive", json=body,
                      headers=_headers(api_key), timeout=timeout) as response:
        if response.status_code != 200:
            response.read()
            raise RuntimeError(_error_message(response))
        for line in response.iter_lines():
            if line.strip():
                item = json.loads(line)
                if "error" in item:
                    raise RuntimeError(item["error"].get("message", str(item)))
                yield item


def end_session(url: str, session_id: int, api_key: str | None = None) -> None:
    body = {"prompt": "", "session_id": session_id, "interactive_mode": False,
            "request_output_len": 0}
    response = httpx.post(url.rstrip("/") + "/v1/chat/interactive", json=body,
                          headers=_headers(api_key), timeout=60)
    if response.status_code != 200:
        raise RuntimeError(_error_message(response))


def _error_message(response: httpx.Response) -> str:
    try:
        return f"HTTP {response.status_code}: {response.json()['error']['message']}"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}: {response.text[:200]}"


def read_prompt(input_fn: Callable[[str], str]) -> str:
    """Lines until an empty one (double Enter ends the input), as LMDeploy's client."""
    lines = [input_fn("\ndouble enter to end input >>> ")]
    while lines[-1] != "":
        lines.append(input_fn(""))
    return "\n".join(lines[:-1]).strip()


def _check_reachable(url: str, api_key: str | None) -> None:
    from tpserve.engine.errors import ConfigError

    try:
        httpx.get(url.rstrip("/") + "/health", headers=_headers(api_key), timeout=10)
    except httpx.HTTPError as exc:
        raise ConfigError(f"cannot reach {url} ({exc}); start a server with `tpserve serve "
                          f"api_server` or check the URL") from None


def api_client_repl(url: str, session_id: int = 1, api_key: str | None = None,
                    request_output_len: int = 512, input_fn: Callable[[str], str] = input,
                    out: TextIO = sys.stdout) -> None:
    _check_reachable(url, api_key)
    while True:
        try:
            prompt = read_prompt(input_fn)
        except (EOFError, KeyboardInterrupt):
            prompt = "exit"
        if prompt in ("exit", "end"):
            try:
                end_session(url, session_id, api_key)
            except httpx.HTTPError as exc:  # the server went away: nothing left to end
                print(f"error: could not end the session ({exc})", file=out, flush=True)
            if prompt == "exit":
                return
            print("(session ended; a new conversation starts)", file=out, flush=True)
            continue
        if not prompt:
            continue
        try:
            finish, tokens = None, 0
            for item in stream_interactive(url, prompt, session_id, api_key=api_key,
                                           request_output_len=request_output_len):
                print(item["text"], end="", file=out, flush=True)
                finish, tokens = item["finish_reason"] or finish, item["tokens"]
            print(file=out, flush=True)
            if finish == "length" and tokens < request_output_len:
                print("(the session is full: type `end` to start a new one)", file=out, flush=True)
        except (RuntimeError, httpx.HTTPError) as exc:
            print(f"\nerror: {exc}", file=out, flush=True)
