"""AsyncLLMEngine: an LLMEngine stepping in its own thread, streamed to asyncio.

The engine is touched only by its thread. Coroutines send it commands (add,
abort, end a session) through a queue; the thread runs them between steps
and hands each request's outputs to that request's asyncio queue on the
caller's event loop. A consumer that goes away (client disconnect, task
cancelled) aborts its request. If a step raises, every waiting stream gets
EngineDeadError instead of hanging, and so does every later call.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Sequence

from .errors import RequestError
from .llm_engine import LLMEngine
from .outputs import RequestOutput
from .request import child_request_ids
from .sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_SHUTDOWN = object()


class EngineDeadError(RuntimeError):
    """The engine loop stopped (a step failed, or shutdown() was called)."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue  # RequestOutput items, or an exception to raise

    def put(self, item: RequestOutput | BaseException) -> None:
        _post(self.loop, self.queue.put_nowait, item)


def _post(loop: asyncio.AbstractEventLoop, fn: Callable, arg) -> None:
    try:
        loop.call_soon_threadsafe(fn, arg)
    except RuntimeError:  # the consumer's loop is closed: nobody is listening
        pass


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for q, item in items:
        q.put_nowait(item)


class AsyncLLMEngine:
    """health_check_period_s: while idle, the loop asks the runner's `check_health`
    (a tensor-parallel executor's: are all ranks alive?) this often, so a rank that
    dies between requests stops the engine before the next request finds it."""

    def __init__(self, engine: LLMEngine, health_check_period_s: float = 5.0) -> None:
        self.engine = engine
        self.health_check_period_s = health_check_period_s
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, _Stream] = {}  # per sample id; owned by the engine thread
        self._held: list[RequestOutput] = []  # the last step's outputs, not yet handed over
        self._lock = threading.Lock()  # orders submissions against the loop's death
        self._dead: BaseException | None = None
        self._thread = threading.Thread(target=self._run_loop, name="tpserve-engine", daemon=True)
        self._thread.start()

    # -- the asyncio side ---------------------------------------------------------

    async def generate(self, prompt_token_ids: Sequence[int], sampling_params: SamplingParams,
                       request_id: str, session_id: int | str | None = None,
                       keep_session: bool = False) -> AsyncIterator[RequestOutput]:
        """Yields the request's outputs as they come (for n > 1, each sample's, by request_id)."""
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        try:
            await self._call(self._add, request_id, list(prompt_token_ids), sampling_params,
                             session_id, keep_session, stream)
        except asyncio.CancelledError:  # it may have been added just before
            self._submit((self._abort, (request_id,), None))
            raise
        remaining = sampling_params.n
        try:
            while remaining:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                remaining -= item.finished
                yield item
        finally:
            if remaining:  # the consumer left early (disconnect, cancel): stop the request
                self._submit((self._abort, (request_id,), None))

    async def abort(self, request_id: str) -> None:
        """Stops a request; its stream ends with finish_reason 'abort'."""
        await self._call(self._abort, request_id)

    async def end_session(self, session_id: int | str) -> None:
        await self._call(self._end_session, session_id)

    async def stats(self) -> dict:
        """EngineStats as a dict (running, waiting, kv_cache_usage, prefix_cache_hit_rate, ...)."""
        return (await self._call(self.engine.stats)).to_dict()

    async def check_health(self) -> None:
        """Raises EngineDeadError once the loop has stopped."""
        if not self.is_running:
            raise EngineDeadError(f"the engine is not running: {self._dead}")

    def shutdown(self, timeout: float | None = 30.0) -> None:
        """Stops the loop; streams still open end with EngineDeadError."""
        if self._submit(_SHUTDOWN):
            self._thread.join(timeout)

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and self._dead is None

    async def _call(self, fn: Callable, *args):
        future: concurrent.futures.Future = concurrent.futures.Future()
        if not self._submit((fn, args, future)):
            raise EngineDeadError(f"the engine is not running: {self._dead}") from self._dead
        return await asyncio.wrap_future(future)

    def _submit(self, command) -> bool:
        with self._lock:
            if self._dead is not None:
                return False
            self._commands.put(command)
            return True

    # -- the engine thread -----------------------------------------------------

    def _add(self, request_id, prompt_token_ids, params, session_id, keep_session, stream) -> None:
        ids = child_request_ids(request_id, params.n)
        for cid in ids:
            if cid in self._streams:
                raise RequestError(f"request id {request_id!r} is already in use; "
                                   "give each request a unique id")
        self.engine.add_request(request_id, prompt_token_ids, params, session_id, keep_session)
        self._streams.update((cid, stream) for cid in ids)

    def _abort(self, request_id: str) -> None:
        self._deliver(self.engine.abort_request(request_id))

    def _end_session(self, session_id: int | str) -> None:
        self._deliver(self.engine.end_session(session_id))

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """Hands outputs (after any still held from the last step) to their streams: one
        wake-up per event loop, not one per output (each is a write to the loop's
        self-pipe, on the step's path)."""
        held, self._held = self._held, []
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for output in held + outputs:
            stream = self._streams.get(output.request_id)
            if output.finished:
                self._streams.pop(output.request_id, None)
            if stream is not None:
                by_loop.setdefault(stream.loop, []).append((stream.queue, output))
        for loop, items in by_loop.items():
            _post(loop, _put_all, items)

    def _run_loop(self) -> None:
        """Steps while there is work, running the callers' commands between steps.

        With async scheduling, step t+1 is scheduled and started before step t's
        tokens are read (LLMEngine.steps). A step's outputs are handed over only
        once the next step is under way: streaming them (on the event loop's thread)
        takes the GIL for a while, and doing that while the device computes keeps it
        off the step's critical path.
        """
        step = None
        try:
            while True:
                ahead = self.engine.begin_step(after=step) \
                    if self.engine.can_schedule_ahead(step) else None
                if step is not None:
                    self._held = self.engine.finish_step(step)
                step = ahead
                idle = step is None and not self._held and not self.engine.has_unfinished()
                if not self._run_commands(block=idle):
                    break
                if step is None and self.engine.has_unfinished():
                    step = self.engine.begin_step()
                self._deliver([])
            if step is not None:
                self._held = self.engine.finish_step(step)
            self._deliver([])
            self._die(EngineDeadError("the engine was shut down"))
        except BaseException as exc:  # noqa: BLE001 - every failure must reach the waiting streams
            logger.exception("engine step failed")
            dead = EngineDeadError(f"the engine loop failed: {exc!r}")
            dead.__cause__ = exc
            self._die(dead)

    def _run_commands(self, block: bool) -> bool:
        """Runs queued commands (waiting for one when idle); False once shutdown is asked."""
        try:
            command = self._commands.get(block=block, timeout=self.health_check_period_s
                                         if block else None)
        except queue.Empty:
            if block:  # idle: a dead rank raises here and stops the loop
                check = getattr(self.engine.runner, "check_health", None)
                if check is not None:
                    check()
            return True
        while True:
            if command is _SHUTDOWN:
                return False
            fn, args, future = command
            # a caller that gave up before its command ran is skipped
            if future is None or future.set_running_or_notify_cancel():
                self._execute(fn, args, future)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return True

    @staticmethod
    def _execute(fn: Callable, args: tuple, future: concurrent.futures.Future | None) -> None:
        try:
            result = fn(*args)
        except Exception as exc:  # noqa: BLE001 - handed to the caller
            if future is None:
                logger.warning("engine command %s failed: %s", fn.__name__, exc)
            else:
                future.set_exception(exc)
        else:
            if future is not None:
                future.set_result(result)

    def _die(self, error: EngineDeadError) -> None:
        with self._lock:
            self._dead = error
        for stream in {id(s): s for s in self._streams.values()}.values():
            stream.put(error)
        self._streams.clear()
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command is not _SHUTDOWN and command[2] is not None \
                    and command[2].set_running_or_notify_cancel():
                command[2].set_exception(error)
