"""LMDeploy's own routes: stateful `/v1/chat/interactive` and `/v1/encode`.

An interactive session keeps its KV cache in the engine between calls
(`interactive_mode: true`); each call then sends only the new part of the
conversation. The server remembers, per session, the exact text already in
the cache, renders the whole conversation with the chat template and sends the
difference, so the template's turn markers stay right.
"""
from __future__ import annotations

import asyncio
import json
import random
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from .errors_http import APIError, bad_request, to_api_error
from .protocol import EncodeRequest, InteractiveRequest, parse_body
from .serving_engine import ServingEngine


@dataclass
class Session:
    messages: list[dict] = field(default_factory=list)
    cached_text: str = ""  # the conversation text whose KV the engine holds
    num_tokens: int = 0
    last_token: int | None = None  # the token that ended the last reply (in the cache too)
    busy: bool = False
    engine_restarts: int = 0  # the serving engine's rebuild count when its KV was cached

    def forget_cache(self) -> None:
        """The engine that held this session's KV was rebuilt: the next turn sends the
        whole conversation again (the history itself is kept)."""
        self.cached_text, self.num_tokens, self.last_token = "", 0, None


@dataclass
class _Turn:
    session_id: int
    messages: list[dict]
    new_text: str
    prompt_ids: list[int]
    max_tokens: int


class SessionStore:
    def __init__(self) -> None:
        self.sessions: dict[int, Session] = {}

    def new_id(self) -> int:
        while True:
            sid = random.randint(10087, 2**31 - 1)
            if sid not in self.sessions:
                return sid


def _plan_turn(serving: ServingEngine, session: Session, sid: int, body: InteractiveRequest) -> _Turn:
    messages = session.messages + [{"role": "user", "content": body.prompt}]
    new_text = _new_text(serving, session, messages)
    prompt_ids = serving.encode(new_text, add_bos=False)  # templates write their own BOS
    total = session.num_tokens + len(prompt_ids)
    if total >= serving.max_model_len:
        raise bad_request(
            f"session {sid} would hold {total} tokens but the session length is "
            f"{serving.max_model_len}; end it (interactive_mode=false, request_output_len=0) "
            "and start a new one", param="prompt", code="context_length_exceeded")
    max_tokens = min(body.request_output_len, serving.max_model_len - total)
    return _Turn(sid, messages, new_text, prompt_ids, max_tokens)


def _new_text(serving: ServingEngine, session: Session, messages: list[dict]) -> str:
    """The conversation text the engine does not hold yet."""
    if not session.messages or not session.cached_text:
        return serving.render_chat(messages)
    ended = "" if session.last_token is None else serving.token_text(session.last_token)
    text = serving.next_turn_text(messages[-1]["content"], ended)
    if text is not None:
        return text
    full = serving.render_chat(messages)
    if full.startswith(session.cached_text):
        return full[len(session.cached_text):]
    return serving.render_chat(messages[-1:])  # a template that rewrites earlier turns


async def _end_session(serving: ServingEngine, store: SessionStore, sid: int) -> None:
    if store.sessions.pop(sid, None) is not None:
        await serving.end_session(sid)


async def chat_interactive(request: Request):
    serving: ServingEngine = request.app.state.serving
    store: SessionStore = request.app.state.sessions
    body = parse_body(InteractiveRequest, await request.body())
    sid = store.new_id() if body.session_id == -1 else body.session_id
    if body.request_output_len == 0 and not body.interactive_mode:
        await _end_session(serving, store, sid)
        return JSONResponse({"text": "", "tokens": 0, "finish_reason": None})
    session = store.sessions.get(sid) or Session(engine_restarts=serving.restarts)
    if session.busy:
        raise APIError(409, f"session {sid} is answering another request; wait for it to finish",
                       param="session_id", code="session_busy")
    if session.engine_restarts != serving.restarts:
        session.forget_cache()
        session.engine_restarts = serving.restarts
    turn = _plan_turn(serving, session, sid, body)
    store.sessions[sid] = session
    session.busy = True
    lines = _run_turn(serving, store, session, turn, body)
    if body.stream:
        first = await anext(lines, None)
        return StreamingResponse(_ndjson(first, lines), media_type="application/x-ndjson")
    result = {"text": "", "tokens": 0, "finish_reason": None}
    async for line in lines:
        result = {"text": result["text"] + line["text"], "tokens": line["tokens"],
                  "finish_reason": line["finish_reason"]}
    return JSONResponse(result)


async def _ndjson(first: dict | None, lines: AsyncIterator[dict]) -> AsyncIterator[str]:
    try:
        if first is not None:
            yield json.dumps(first, ensure_ascii=False) + "\n"
        async for line in lines:
            yield json.dumps(line, ensure_ascii=False) + "\n"
    except Exception as exc:
        yield json.dumps(to_api_error(exc).body()) + "\n"
    finally:
        await lines.aclose()


async def _run_turn(serving: ServingEngine, store: SessionStore, session: Session, turn: _Turn,
                    body: InteractiveRequest) -> AsyncIterator[dict]:
    """Runs one turn; yields `{"text": delta, "tokens": generated so far, "finish_reason"}`."""
    text, tokens, finished, last_token = "", 0, False, None
    rid = f"interactive-{turn.session_id}-{uuid.uuid4().hex[:8]}"
    stream = serving.generate(turn.prompt_ids, body.sampling_params(turn.max_tokens), rid,
                              session_id=turn.session_id, keep_session=body.interactive_mode)
    try:
        async for out in stream:
            if out.finish_reason == "abort":
                raise APIError(503, "the request was aborted by the server; retry it")
            text += out.delta_text
            tokens += len(out.delta_token_ids)
            finished = out.finished
            last_token = out.delta_token_ids[-1] if out.delta_token_ids else last_token
            if out.delta_text or out.finished:
                yield {"text": out.delta_text, "tokens": tokens, "finish_reason": out.finish_reason}
    finally:
        await stream.aclose()
        session.busy = False
        if finished and body.interactive_mode:
            session.messages = turn.messages + [{"role": "assistant", "content": text}]
            session.cached_text += turn.new_text + text
            session.num_tokens += len(turn.prompt_ids) + tokens
            session.last_token = last_token
        else:  # one-shot call, or a turn cut short: the engine no longer holds a usable session
            store.sessions.pop(turn.session_id, None)
            if not finished and body.interactive_mode:
                asyncio.get_running_loop().create_task(_quiet(serving.end_session(turn.session_id)))


async def _quiet(coro) -> None:
    try:
        await coro
    except Exception:
        pass


async def encode(request: Request):
    serving: ServingEngine = request.app.state.serving
    body = parse_body(EncodeRequest, await request.body())

    def ids(text: str) -> list[int]:
        if body.do_preprocess:
            text = serving.render_chat([{"role": "user", "content": text}])
        return serving.encode(text, add_bos=body.add_bos)

    if isinstance(body.input, str):
        input_ids = ids(body.input)
        return JSONResponse({"input_ids": input_ids, "length": len(input_ids)})
    batch = [ids(t) for t in body.input]
    return JSONResponse({"input_ids": batch, "length": [len(b) for b in batch]})


ROUTES = [
    Route("/v1/chat/interactive", chat_interactive, methods=["POST"]),
    Route("/v1/encode", encode, methods=["POST"]),
]
