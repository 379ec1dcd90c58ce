"""OpenAI-compatible routes: /v1/models, /v1/chat/completions, /v1/completions."""
from __future__ import annotations

import dataclasses
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from tpserve.engine.outputs import RequestOutput, TokenLogprob
from tpserve.engine.sampling_params import SamplingParams

from . import openai_format as fmt
from .errors_http import APIError, error_chunk
from .protocol import ChatCompletionRequest, CompletionRequest, parse_body
from .serving_engine import ServingEngine


@dataclass
class _Choice:
    text: str = ""
    num_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class _Job:
    """One API request: its prompts times `n` samples, run as engine requests."""

    serving: ServingEngine
    prefix: str
    prompts: list[list[int]]
    n: int
    params: SamplingParams
    rid: str = ""
    created: int = 0

    def __post_init__(self) -> None:
        self.rid = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        prompts, params, ids = [], [], []
        for p, prompt in enumerate(self.prompts):
            for j in range(self.n):
                seed = None if self.params.seed is None else self.params.seed + j
                prompts.append(prompt)
                params.append(dataclasses.replace(self.params, seed=seed))
                ids.append(f"{self.rid}-{p * self.n + j}")
        return self.serving.generate_many(prompts, params, ids)

    async def collect(self) -> list[_Choice]:
        choices = [_Choice() for _ in range(len(self.prompts) * self.n)]
        async with aclosing(self.outputs()) as outputs:
            async for i, out in outputs:
                _check_not_aborted(out)
                c = choices[i]
                c.text += out.delta_text
                c.num_tokens += len(out.delta_token_ids)
                c.logprobs.extend(out.delta_logprobs)
                c.finish_reason = out.finish_reason or c.finish_reason
        return choices


def _check_not_aborted(out: RequestOutput) -> None:
    if out.finish_reason == "abort":
        raise APIError(503, "the request was aborted by the server (shutting down?); retry it")


def _check_model(serving: ServingEngine, model: str | None) -> None:
    if model is not None and model != serving.model_id:
        raise APIError(404, f"the model `{model}` does not exist; this server serves "
                            f"`{serving.model_id}` (see GET /v1/models)",
                       param="model", code="model_not_found")


async def stream_sse(events: AsyncIterator[dict]) -> StreamingResponse:
    """SSE response; the first event is awaited first so early errors keep their status."""
    first = await anext(events, None)

    async def body() -> AsyncIterator[str]:
        try:
            if first is not None:
                yield fmt.sse(first)
            async for event in events:
                yield fmt.sse(event)
        except Exception as exc:
            yield error_chunk(exc)
        finally:
            await events.aclose()
        yield fmt.SSE_DONE

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# ---- chat ------------------------------------------------------------------
async def chat_completions(request: Request):
    serving: ServingEngine = request.app.state.serving
    body = parse_body(ChatCompletionRequest, await request.body())
    _check_model(serving, body.model)
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in body.messages]
    prompt_ids = serving.chat_prompt_ids(messages)
    serving.check_prompt(prompt_ids, "messages")
    max_tokens = serving.max_new_tokens(len(prompt_ids), body.requested_max_tokens())
    job = _Job(serving, "chatcmpl", [prompt_ids], body.n,
               body.sampling_params(max_tokens, body.num_logprobs()))
    if body.stream:
        return await stream_sse(_chat_events(job, body))
    choices = await job.collect()
    out = [{"index": i, "message": {"role": "assistant", "content": c.text},
            "logprobs": fmt.chat_logprobs(c.logprobs, serving.token_text) if body.logprobs else None,
            "finish_reason": c.finish_reason} for i, c in enumerate(choices)]
    usage = fmt.usage(job.prompt_tokens, sum(c.num_tokens for c in choices))
    return JSONResponse(fmt.chat_completion(job.rid, job.created, serving.model_id, out, usage))


async def _chat_events(job: _Job, body: ChatCompletionRequest) -> AsyncIterator[dict]:
    started: set[int] = set()

    def choice_of(i: int, out) -> dict | None:
        delta: dict = {}
        if i not in started:
            started.add(i)
            delta["role"] = "assistant"
        if out.delta_text or delta:
            delta["content"] = out.delta_text
        if not delta and not out.finished and not out.delta_logprobs:
            return None
        logprobs = (fmt.chat_logprobs(out.delta_logprobs, job.serving.token_text)
                    if body.logprobs else None)
        return {"index": i, "delta": delta, "logprobs": logprobs,
                "finish_reason": out.finish_reason}

    async with aclosing(_events(job, body.include_usage(), choice_of, fmt.chat_chunk)) as events:
        async for event in events:
            yield event


# ---- completions -----------------------------------------------------------
async def completions(request: Request):
    serving: ServingEngine = request.app.state.serving
    body = parse_body(CompletionRequest, await request.body())
    _check_model(serving, body.model)
    prompts = []
    for k, p in enumerate(body.prompts()):
        ids = serving.encode(p, add_bos=True) if isinstance(p, str) else list(p)
        serving.check_prompt(ids, "prompt" if len(body.prompts()) == 1 else f"prompt.{k}")
        prompts.append(ids)
    max_tokens = serving.max_new_tokens(max(len(p) for p in prompts), body.requested_max_tokens())
    job = _Job(serving, "cmpl", prompts, body.n, body.sampling_params(max_tokens, body.logprobs))
    if body.stream:
        return await stream_sse(_completion_events(job, body))
    choices = await job.collect()
    out = [{"index": i, "text": c.text,
            "logprobs": (fmt.completion_logprobs(c.logprobs, serving.token_text, 0)
                         if body.logprobs is not None else None),
            "finish_reason": c.finish_reason} for i, c in enumerate(choices)]
    usage = fmt.usage(job.prompt_tokens, sum(c.num_tokens for c in choices))
    return JSONResponse(fmt.text_completion(job.rid, job.created, serving.model_id, out, usage))


async def _completion_events(job: _Job, body: CompletionRequest) -> AsyncIterator[dict]:
    offsets: dict[int, int] = {}  # text already sent per choice, for logprobs' text_offset

    def choice_of(i: int, out) -> dict | None:
        if not out.delta_text and not out.finished and not out.delta_logprobs:
            return None
        logprobs = None
        if body.logprobs is not None:
            logprobs = fmt.completion_logprobs(out.delta_logprobs, job.serving.token_text,
                                               offsets.get(i, 0))
        offsets[i] = offsets.get(i, 0) + len(out.delta_text)
        return {"index": i, "text": out.delta_text, "logprobs": logprobs,
                "finish_reason": out.finish_reason}

    async with aclosing(_events(job, body.include_usage(), choice_of,
                                fmt.completion_chunk)) as events:
        async for event in events:
            yield event


async def _events(job: _Job, with_usage: bool, choice_of: Callable[[int, Any], dict | None],
                  chunk: Callable[..., dict]) -> AsyncIterator[dict]:
    """What both endpoints stream: a chunk for each output that `choice_of` turns into a
    choice (None: nothing to send), then the usage chunk when the client asked for it."""
    model, completion_tokens = job.serving.model_id, 0
    async with aclosing(job.outputs()) as outputs:
        async for i, out in outputs:
            _check_not_aborted(out)
            completion_tokens += len(out.delta_token_ids)
            choice = choice_of(i, out)
            if choice is not None:
                yield chunk(job.rid, job.created, model, choice, None, with_usage)
    if with_usage:
        yield chunk(job.rid, job.created, model, None,
                    fmt.usage(job.prompt_tokens, completion_tokens), True)


async def list_models(request: Request):
    serving: ServingEngine = request.app.state.serving
    return JSONResponse(fmt.model_list(serving.model_id, request.app.state.created,
                                       serving.max_model_len))


ROUTES = [
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
]
