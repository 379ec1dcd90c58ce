"""The scheduler: which requests run in the next step, and how many tokens each.

There are no prefill and decode phases. Each step has a token budget
(`max_prefill_tokens`) and a request cap (`max_batch_size`); running requests
come first (one decode token each, or the next chunk of an unfinished
prompt), then waiting ones in arrival order, each getting
`min(remaining tokens, budget left)`. When KV blocks run out, the most
recently started running request is preempted: its blocks are freed and it
returns to the front of the queue, to be recomputed (often from the prefix
cache) later.

Interactive sessions: a finished request whose `keep_session` is set leaves
its tokens and blocks to its session; the session's next request continues
from them and only computes its new tokens. When a request cannot get blocks,
idle sessions give theirs up first, least recently used first (their next
turn recomputes the history, mostly from the prefix cache), then waiting
session turns, before a running request is preempted or anything fails.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .block_manager import KVBlockPool
from .config import EngineConfig
from .errors import RequestError
from .request import Request, RequestStatus

PENDING_TOKEN = 0  # stands in for a token still being sampled (any valid id would do)


@dataclass(frozen=True)
class ScheduledChunk:
    """num_new_tokens of `request`, starting at position context_len, run this step.

    wants_logits: the chunk reaches the request's last token, so the step
    samples a new one (a chunk in the middle of a prompt does not).
    A decode chunk scheduled while the step that samples its token is still in
    flight (async scheduling) has that token pending: `token_ids` shows it as
    PENDING_TOKEN and the runner takes it from the previous step's samples.
    """

    request: Request
    context_len: int
    num_new_tokens: int
    wants_logits: bool

    @classmethod
    def of(cls, request: Request, num_new_tokens: int) -> "ScheduledChunk":
        context = request.num_computed_tokens
        end = context + num_new_tokens
        return cls(request, context, num_new_tokens,
                   end == len(request.token_ids) + request.num_pending)

    @property
    def token_ids(self) -> list[int]:
        known = self.request.token_ids[self.context_len:self.context_len + self.num_new_tokens]
        return known + [PENDING_TOKEN] * (self.num_new_tokens - len(known))

    @property
    def last_token_pending(self) -> bool:
        return self.context_len + self.num_new_tokens > self.request.num_tokens


@dataclass(frozen=True)
class SchedulerOutput:
    scheduled: tuple[ScheduledChunk, ...]
    preempted: tuple[Request, ...] = ()
    finished: tuple[Request, ...] = ()  # stopped by the scheduler: they can never fit the cache

    @property
    def num_scheduled_tokens(self) -> int:
        return sum(c.num_new_tokens for c in self.scheduled)


@dataclass
class Session:
    """What an interactive session holds between its requests."""

    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    active_request_id: str | None = None


class Scheduler:
    def __init__(self, config: EngineConfig, pool: KVBlockPool) -> None:
        self.config = config
        self.pool = pool
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.sessions: dict[int | str, Session] = {}
        self.num_preemptions = 0
        self.num_session_evictions = 0  # idle sessions whose blocks were taken back

    # -- requests and sessions ------------------------------------------------

    def session_context(self, session_id: int | str | None) -> list[int]:
        session = self.sessions.get(session_id) if session_id is not None else None
        return list(session.token_ids) if session else []

    def add_request(self, request: Request) -> None:
        self.validate(request)
        session = self.sessions.get(request.session_id) if request.session_id is not None else None
        if session is not None:
            request.block_ids, session.block_ids = session.block_ids, []
            request.block_hashes = session.block_hashes
            request.num_computed_tokens = request.num_cached_tokens = session.num_computed_tokens
            session.active_request_id = request.request_id
        elif request.session_id is not None:
            self.sessions[request.session_id] = Session(active_request_id=request.request_id)
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def validate(self, request: Request) -> None:
        """Raises RequestError when the request can never be served."""
        if request.request_id in self.requests:
            raise RequestError(f"request id {request.request_id!r} is already in use; "
                               "give each request a unique id")
        if request.num_prompt_tokens == request.num_context_tokens:
            raise RequestError("the prompt is empty; send at least one token")
        session = self.sessions.get(request.session_id) if request.session_id is not None else None
        if session is not None and session.active_request_id is not None:
            raise RequestError(f"session {request.session_id!r} already has a request in progress; "
                               "wait for it to finish or abort it")
        if request.num_prompt_tokens >= self.config.session_len:
            raise RequestError(
                f"the prompt has {request.num_prompt_tokens - request.num_context_tokens} tokens"
                + (f" on top of the session's {request.num_context_tokens}" if request.num_context_tokens else "")
                + f", leaving no room to generate within session_len={self.config.session_len}; "
                "shorten the prompt, end the session, or raise --session-len")

    def finish(self, request: Request, reason: str, error: str | None = None) -> None:
        """Stops a request (any state) and releases its blocks, or hands them to its session."""
        if request.is_finished:
            return
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason, request.error = reason, error
        del self.requests[request.request_id]
        self._release(request)

    def abort(self, request_id: str) -> Request | None:
        request = self.requests.get(request_id)
        if request is not None:
            self.finish(request, "abort")
        return request

    def end_session(self, session_id: int | str) -> bool:
        """Frees a session's blocks, aborting its request in progress if any."""
        session = self.sessions.get(session_id)
        if session is None:
            return False
        if session.active_request_id is not None:
            self.requests[session.active_request_id].keep_session = False
            self.abort(session.active_request_id)
        session = self.sessions.pop(session_id, None)
        if session is not None:
            self.pool.free_blocks(session.block_ids)
        return True

    def _release(self, request: Request) -> None:
        if request.session_id is None:
            self.pool.free(request)
            return
        if not request.keep_session:
            self.sessions.pop(request.session_id, None)
            self.pool.free(request)
            return
        # a pending token that never arrived (stopped mid-flight) is not the session's;
        # re-inserted so that the dict runs from least to most recently used
        self.sessions.pop(request.session_id, None)
        self.sessions[request.session_id] = Session(
            token_ids=request.token_ids,
            num_computed_tokens=min(request.num_computed_tokens, request.num_tokens),
            block_ids=request.block_ids, block_hashes=request.block_hashes)
        request.block_ids = []

    # -- the step ------------------------------------------------------------

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_prefill_tokens
        scheduled: list[ScheduledChunk] = []
        preempted: list[Request] = []
        finished: list[Request] = []
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            if request.length_reached(self.config.session_len):
                i += 1  # its pending token ends it
                continue
            n = min(request.num_remaining_tokens, budget)
            if not self._allocate_or_preempt(request, n, preempted, finished):
                break
            scheduled.append(ScheduledChunk.of(request, n))
            budget -= n
            i += 1
        if not preempted:
            budget = self._admit_waiting(budget, scheduled, finished)
        return SchedulerOutput(tuple(scheduled), tuple(preempted), tuple(finished))

    def _allocate_or_preempt(self, request: Request, n: int,
                             preempted: list[Request], finished: list[Request]) -> bool:
        while not self.pool.allocate_slots(request, n):
            if self._evict_idle_session():
                continue
            if len(self.running) == 1:
                if self._reclaim_waiting_blocks():
                    continue
                self.finish(request, "length", error=self._cache_full_message(request))
                finished.append(request)
                return False
            victim = self.running[-1]
            self._preempt(victim)
            preempted.append(victim)
            if victim is request:
                return False
        return True

    def _admit_waiting(self, budget: int, scheduled: list[ScheduledChunk],
                       finished: list[Request]) -> int:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_batch_size:
            request = self.waiting[0]
            if self.pool.blocks_needed(request.num_tokens) > self.pool.num_blocks:
                self.finish(request, "length", error=self._cache_full_message(request))
                finished.append(request)
                continue
            fresh = not request.block_ids
            cached = self.pool.get_computed_blocks(request) if fresh else 0
            n = min(request.num_remaining_tokens, budget)
            if not self.pool.allocate_slots(request, n):
                if fresh:
                    self.pool.free(request)
                if self._evict_idle_session():
                    continue
                if not self.running:  # nothing running will free blocks
                    if self._reclaim_waiting_blocks(keep=request):
                        continue
                    self.finish(request, "length", error=self._cache_full_message(request))
                    finished.append(request)
                    continue
                break
            if fresh:
                self.pool.record_prefix_lookup(request.num_tokens, cached)
            if request.status == RequestStatus.WAITING and fresh:
                request.num_cached_tokens = cached
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled.append(ScheduledChunk.of(request, n))
            budget -= n
        return budget

    def _evict_idle_session(self) -> bool:
        """Frees the blocks of the least recently used session with no request in
        progress (it keeps its tokens: its next turn recomputes them). Whether one was."""
        for session in self.sessions.values():
            if session.active_request_id is None and session.block_ids:
                self.pool.free_blocks(session.block_ids)
                session.block_ids, session.num_computed_tokens = [], 0
                self.num_session_evictions += 1
                return True
        return False

    def _reclaim_waiting_blocks(self, keep: Request | None = None) -> bool:
        """Frees the blocks that waiting requests hold (a session's next turn holds the
        session's cache while it waits), so that a request that cannot otherwise fit
        can run; they are recomputed, mostly from the prefix cache, when admitted.
        Whether anything was freed."""
        freed = False
        for waiting in self.waiting:
            if waiting is not keep and waiting.block_ids:
                self.pool.free(waiting)
                freed = True
        return freed

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.pool.free(request)
        request.status = RequestStatus.PREEMPTED
        self.waiting.appendleft(request)
        self.num_preemptions += 1

    def _cache_full_message(self, request: Request) -> str:
        return (f"request {request.request_id!r} needs {self.pool.blocks_needed(request.num_tokens)} "
                f"KV blocks of {self.pool.block_size} tokens but the cache has {self.pool.num_blocks}"
                "; raise --cache-max-entry-count or shorten the request")
