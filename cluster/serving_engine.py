"""Glue between the async engine and the HTTP routes.

`ServingEngine` holds what the routes need and nothing more: the async engine,
the tokenizer, the chat template, the served model id and the context length.
It turns chat messages into prompt ids, checks lengths, and wraps the engine's
output stream so that metrics are observed and a stream the client abandons
(disconnect, cancelled task) aborts its request, freeing its KV blocks.

When the engine dies under a request (a tensor-parallel worker process was
killed, a step failed), every request in flight ends with a 503 error at once,
and, given a `rebuild` function, the serving engine builds a fresh engine in a
background thread (new worker processes, same model and options). Requests that
arrive meanwhile wait for it, up to `restart_wait_s`, then get a 503 to retry.
`check_health` raises only when the engine is dead for good (no `rebuild`, or
the rebuild failed), so Ray Serve replaces the replica as a last resort.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import time
from contextlib import aclosing
from typing import Any, AsyncIterator, Callable, Sequence

from tpserve.engine.outputs import RequestOutput
from tpserve.engine.sampling_params import SamplingParams

from .errors_http import APIError, bad_request
from .metrics import ServerMetrics

logger = logging.getLogger(__name__)

EngineBuilder = Callable[[], Any]  # frees what the dead engine held; returns a fresh one
DEFAULT_RESTART_WAIT_S = 60.0
RETRY_AFTER_S = 5  # what a 503 during a rebuild tells clients to wait


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


class ServingEngine:
    """rebuild: called in a worker thread after the engine died; None = a dead engine stays dead.
    restart_wait_s: how long a new request waits for a rebuild before it gets a 503."""

    def __init__(self, engine: Any, tokenizer: Any, chat_template: Any, model_id: str,
                 max_model_len: int, metrics: ServerMetrics | None = None,
                 rebuild: EngineBuilder | None = None,
                 restart_wait_s: float = DEFAULT_RESTART_WAIT_S) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.model_id = model_id
        self.max_model_len = max_model_len
        self.metrics = metrics or ServerMetrics(model_id)
        self.rebuild = rebuild
        self.restart_wait_s = restart_wait_s
        self.restarts = 0  # engines rebuilt so far
        self._restart: asyncio.Task | None = None
        self._restart_error: BaseException | None = None
        self._closing = False
        self._cleanups: set[asyncio.Task] = set()

    # ---- prompts -------------------------------------------------------
    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return self.chat_template.render(messages, add_generation_prompt=add_generation_prompt)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = list(self.tokenizer.encode(text, add_special_tokens=add_bos))
        bos = getattr(self.tokenizer, "bos_token_id", None)
        # a template that spells out the BOS text would otherwise get it twice
        if add_bos and bos is not None and len(ids) >= 2 and ids[0] == ids[1] == bos:
            ids = ids[1:]
        return ids

    def chat_prompt_ids(self, messages: list[dict]) -> list[int]:
        # chat templates write the BOS text themselves (as the engine's own chat does)
        return self.encode(self.render_chat(messages), add_bos=False)

    def next_turn_text(self, user: str, previous_reply_ended: str) -> str | None:
        """What continues a kept session after the last reply (None: the template can't say)."""
        next_turn = getattr(self.chat_template, "next_turn", None)
        return None if next_turn is None else next_turn(user, previous_reply_ended)

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def check_prompt(self, prompt_ids: Sequence[int], param: str) -> None:
        if not prompt_ids:
            raise bad_request(f"{param} is empty after tokenization", param=param)
        if len(prompt_ids) >= self.max_model_len:
            raise bad_request(
                f"the prompt has {len(prompt_ids)} tokens but this model's context is "
                f"{self.max_model_len} tokens (prompt plus output); shorten the prompt",
                param=param, code="context_length_exceeded")

    def max_new_tokens(self, prompt_len: int, requested: int | None) -> int:
        """The requested output length, capped at what the context leaves (default: all of it)."""
        room = self.max_model_len - prompt_len
        return room if requested is None else min(requested, room)

    # ---- generation ----------------------------------------------------
    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str,
                       session_id: int | None = None, keep_session: bool = False,
                       ) -> AsyncIterator[RequestOutput]:
        """The engine's incremental outputs; leaving early aborts the request.
        Raises a 503 APIError when the engine dies under it."""
        await self._wait_for_engine()
        engine = self.engine
        kwargs = {} if session_id is None else {"session_id": session_id, "keep_session": keep_session}
        try:
            stream = await _maybe_await(engine.generate(prompt_ids, params, request_id, **kwargs))
        except Exception as exc:
            died = self._death_error(engine)
            if died is None:
                raise
            raise died from exc
        self.metrics.observe_prompt(len(prompt_ids))
        start = last = time.perf_counter()
        first, finished = True, False
        try:
            async for out in stream:
                now = time.perf_counter()
                if out.delta_token_ids:
                    self.metrics.observe_tokens(len(out.delta_token_ids), now - last, first)
                    first, last = False, now
                if out.finished:
                    finished = True
                    self.metrics.observe_finished(out.finish_reason, now - start)
                yield out
        except Exception as exc:
            died = self._death_error(engine)
            if died is None:
                raise
            raise died from exc
        finally:
            if not finished:
                self._cleanup_later(stream, request_id)

    def _cleanup_later(self, stream: Any, request_id: str) -> None:
        # Runs as its own task: the caller may sit in a cancelled scope where any
        # further await would be interrupted before the abort reached the engine.
        task = asyncio.get_running_loop().create_task(self._abort(stream, request_id))
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    async def _abort(self, stream: Any, request_id: str) -> None:
        try:
            if hasattr(stream, "aclose"):
                await stream.aclose()
            await _maybe_await(self.engine.abort(request_id))
        except Exception:  # the request may already be gone; nothing left to free
            pass

    async def generate_many(self, prompts: list[list[int]], params: list[SamplingParams],
                            request_ids: list[str]) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Several requests at once (n > 1, batched prompts), as (index, output) in arrival order."""
        streams = [self.generate(p, sp, rid) for p, sp, rid in zip(prompts, params, request_ids)]
        if len(streams) == 1:
            async with aclosing(streams[0]) as stream:
                async for out in stream:
                    yield 0, out
            return
        async with aclosing(_merge(streams)) as merged:
            async for item in merged:
                yield item

    # ---- engine state --------------------------------------------------
    async def end_session(self, session_id: int) -> None:
        if self._is_dead(self.engine):  # its KV cache, sessions included, is gone
            return
        await _maybe_await(self.engine.end_session(session_id))

    async def stats(self) -> dict:
        stats = getattr(self.engine, "stats", None)
        if stats is None or self._is_dead(self.engine):
            return {}
        return dict(await _maybe_await(stats()))

    async def check_health(self) -> None:
        """Raises when the engine cannot serve and will not come back by itself: it died
        with no way to rebuild it, or its rebuild failed. A rebuild in progress is healthy."""
        if self._restart_error is not None:
            raise RuntimeError(f"the engine died and rebuilding it failed: {self._restart_error}")
        if self._restart is not None:
            return
        engine = self.engine
        try:
            await self._check_engine(engine)
        except Exception:
            if self.rebuild is None or self._closing:
                raise
            self._start_restart(engine)

    async def _check_engine(self, engine: Any) -> None:
        check = getattr(engine, "check_health", None)
        if check is not None:
            await _maybe_await(check())
            return
        if getattr(engine, "errored", False) or self._is_dead(engine):
            raise RuntimeError("the engine loop is not running")

    async def shutdown(self) -> None:
        self._closing = True
        if self._restart is not None:  # a thread cannot be cancelled; shut down what it builds
            await asyncio.wait([self._restart], timeout=self.restart_wait_s)
        for task in list(self._cleanups):
            await asyncio.wait([task], timeout=1.0)
        shutdown = getattr(self.engine, "shutdown", None)
        if shutdown is not None:
            await _maybe_await(shutdown())

    # ---- recovery ------------------------------------------------------
    @staticmethod
    def _is_dead(engine: Any) -> bool:
        return getattr(engine, "is_running", True) is False

    def _death_error(self, engine: Any) -> APIError | None:
        """For a failure that killed the engine, the 503 to send (and a rebuild starts);
        None for anything else, or when nothing can rebuild the engine."""
        if self.rebuild is None or self._closing or not self._is_dead(engine):
            return None
        self._start_restart(engine)  # the cause is in the engine's log, not for clients
        return APIError(503, "the model workers died; the server is restarting them, retry the "
                             "request in a few seconds", code="engine_restarting",
                           retry_after=RETRY_AFTER_S)

    def _start_restart(self, dead_engine: Any) -> None:
        if self._restart is not None or dead_engine is not self.engine or self._closing:
            return  # already rebuilt (or rebuilding) since that engine died
        logger.warning("the engine died; rebuilding it")
        self._restart = asyncio.get_running_loop().create_task(self._run_restart())

    async def _run_restart(self) -> None:
        started = time.perf_counter()
        try:
            engine = await asyncio.to_thread(self.rebuild)
        except Exception as exc:  # noqa: BLE001 - reported by check_health and to waiting requests
            logger.exception("rebuilding the engine failed")
            self._restart_error = exc
        else:
            self.engine, self._restart_error = engine, None
            self.restarts += 1
            logger.warning("engine rebuilt in %.1f s", time.perf_counter() - started)
        finally:
            self._restart = None

    async def _wait_for_engine(self) -> None:
        """Before a request: rebuilds a dead engine, waiting up to restart_wait_s for it."""
        if self.rebuild is None or self._closing:
            return
        if self._restart is None and self._is_dead(self.engine):
            self._start_restart(self.engine)  # also retries a rebuild that failed
        if self._restart is None:
            return
        done, _ = await asyncio.wait([self._restart], timeout=self.restart_wait_s)
        if not done:
            raise APIError(503, "the model workers are restarting; retry the request in a few "
                                "seconds", code="engine_restarting",
                           retry_after=RETRY_AFTER_S)
        if self._restart_error is not None:
            raise APIError(503, f"the model workers died and restarting them failed "
                                f"({self._restart_error}); retry later", code="engine_restarting",
                           retry_after=RETRY_AFTER_S)


async def _merge(streams: list[AsyncIterator]) -> AsyncIterator[tuple[int, Any]]:
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index: int, stream: AsyncIterator) -> None:
        try:
            async for item in stream:
                await queue.put((index, item))
            await queue.put((index, done))
        except Exception as exc:
            await queue.put((index, exc))

    tasks = [asyncio.get_running_loop().create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()


def from_llm(llm: Any, model_id: str | None = None,
             rebuild: EngineBuilder | None = None) -> ServingEngine:
    """A ServingEngine over a `tpserve.engine.llm.LLM` (see deployment.LLMRebuilder)."""
    return ServingEngine(llm.async_engine(), llm.tokenizer, llm.chat_template,
                         model_id or llm.model_name, llm.session_len, rebuild=rebuild)


__all__ = ["ServingEngine", "APIError", "from_llm"]
