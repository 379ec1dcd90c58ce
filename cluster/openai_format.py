"""Response objects of the OpenAI API, built as plain dicts from engine outputs.

Pure functions: the routes decide what to send, these decide how it looks.
"""
from __future__ import annotations

import json
from typing import Callable

from tpserve.engine.outputs import TokenLogprob

TokenText = Callable[[int], str]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def _token_entry(token_text: TokenText, token_id: int, logprob: float) -> dict:
    text = token_text(token_id)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(entries: list[TokenLogprob], token_text: TokenText) -> dict:
    """`choice.logprobs` of a chat completion (or of one chunk's tokens)."""
    content = []
    for e in entries:
        item = _token_entry(token_text, e.token_id, e.logprob)
        item["top_logprobs"] = [_token_entry(token_text, t, lp) for t, lp in e.top]
        content.append(item)
    return {"content": content}


def completion_logprobs(entries: list[TokenLogprob], token_text: TokenText, offset: int) -> dict:
    """`choice.logprobs` of a text completion; `offset` = characters of text before these tokens."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    for e in entries:
        text = token_text(e.token_id)
        tokens.append(text)
        token_logprobs.append(e.logprob)
        top.append({token_text(t): lp for t, lp in e.top} or None)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs,
            "top_logprobs": top, "text_offset": offsets}


def chat_chunk(rid: str, created: int, model: str, choice: dict | None, usage_obj: dict | None,
               with_usage: bool) -> dict:
    chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
             "system_fingerprint": None, "choices": [choice] if choice else []}
    if with_usage:
        chunk["usage"] = usage_obj
    return chunk


def completion_chunk(rid: str, created: int, model: str, choice: dict | None,
                     usage_obj: dict | None, with_usage: bool) -> dict:
    chunk = {"id": rid, "object": "text_completion", "created": created, "model": model,
             "system_fingerprint": None, "choices": [choice] if choice else []}
    if with_usage:
        chunk["usage"] = usage_obj
    return chunk


def chat_completion(rid: str, created: int, model: str, choices: list[dict], usage_obj: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "system_fingerprint": None, "choices": choices, "usage": usage_obj}


def text_completion(rid: str, created: int, model: str, choices: list[dict], usage_obj: dict) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "system_fingerprint": None, "choices": choices, "usage": usage_obj}


def model_list(model_id: str, created: int, max_model_len: int) -> dict:
    return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                        "owned_by": "tpserve", "max_model_len": max_model_len}]}
