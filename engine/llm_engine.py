"""LLMEngine: the step loop that turns requests into streamed outputs.

Each `step()`: schedule -> build the ForwardBatch and the SamplingBatch of the
rows that end their request's tokens -> `runner.submit_step` (forward and
sampling on the runner's device) -> append tokens -> detokenize and check stop
conditions -> one RequestOutput per request that advanced or finished. A step is
`begin_step` (up to the submit) then `finish_step` (the rest), so that a caller
can do other work while the device computes. The runner is anything with the
`ModelRunner` shape below; the ForwardBatch (built on the CPU) is its only
per-step input, so an executor can broadcast it to tensor-parallel ranks unchanged.

Async scheduling (`EngineConfig.async_scheduling`, `steps()`): step t+1 is
scheduled and submitted before step t's tokens are read, so the host's work
(reading tokens, detokenizing, scheduling, building the batch) overlaps the
device's. Each request of step t then has a pending token; step t+1 feeds it
from the runner's copy of step t's samples (ForwardBatch.fed_rows; for penalties,
SamplingBatch.pending_rows). A request
that step t ends (a stop token or string) had one more token computed in step
t+1, which is dropped; requests whose pending token reaches max_tokens or the
session length are not scheduled again.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from .block_manager import KVBlockPool
from .config import EngineConfig
from .detokenizer import IncrementalDetokenizer, Tokenizer, stop_reason
from .errors import RequestError
from .forward_batch import ForwardBatch
from .outputs import LazySlice, RequestOutput, TokenLogprob
from .request import Request, child_request_ids
from .sampler import SamplerOutput, SamplingBatch
from .sampling_params import SamplingParams
from .scheduler import ScheduledChunk, Scheduler

logger = logging.getLogger(__name__)


class ModelRunner(Protocol):
    block_size: int  # tokens per KV block
    num_blocks: int  # KV blocks on every rank
    vocab_size: int  # width of the logits
    device: torch.device

    def execute(self, batch: ForwardBatch) -> torch.Tensor:
        """[S, vocab_size] float32 logits on `device`, one row per batch.logits_indices entry."""
        ...

    def submit_step(self, batch: ForwardBatch, sampling: SamplingBatch | None) -> "StepFuture":
        """Starts running the batch and sampling one token per logits row where the logits
        are (for tensor parallelism: on rank 0, so only token ids travel back); returns
        as soon as the work is under way, so the caller can stream the previous step's
        outputs while the device (or rank 0) computes."""
        ...


class StepFuture(Protocol):
    def result(self) -> SamplerOutput | None:
        """Waits for the step; its SamplerOutput (None when nothing was sampled)."""
        ...


@dataclass
class StepInFlight:
    """A step between `begin_step` and `finish_step`."""

    outputs: list[RequestOutput]  # known before the forward (requests the scheduler stopped)
    chunks: Sequence[ScheduledChunk] = ()
    requests: Sequence[Request] = ()  # rows that sample a token
    future: StepFuture | None = None


@dataclass(frozen=True)
class EngineStats:
    running: int  # requests being generated
    waiting: int  # requests queued (new or preempted)
    num_sessions: int
    kv_cache_usage: float  # fraction of KV blocks in use
    prefix_cache_queries: int  # prompt tokens looked up
    prefix_cache_hits: int  # of them, served from the cache
    prefix_cache_hit_rate: float
    prompt_tokens_total: int
    generation_tokens_total: int
    num_preemptions: int
    num_session_evictions: int  # idle sessions whose KV blocks went to other requests

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class _OutputState:
    detokenizer: IncrementalDetokenizer
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)


class LLMEngine:
    def __init__(self, runner: ModelRunner, tokenizer: Tokenizer | None,
                 engine_config: EngineConfig, eos_token_ids: Sequence[int] = ()) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.config = engine_config
        self.eos_token_ids = frozenset(eos_token_ids)
        self.pool = KVBlockPool(runner.num_blocks, runner.block_size, engine_config.enable_prefix_caching)
        self.scheduler = Scheduler(engine_config, self.pool)
        self._states: dict[str, _OutputState] = {}
        self._children: dict[str, list[str]] = {}  # request id -> its n sample ids, when n > 1
        self._parent_of: dict[str, str] = {}
        self._pending: list[RequestOutput] = []  # outputs decided outside a step (max_tokens=0)
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0

    # -- requests ------------------------------------------------------------

    def add_request(self, request_id: str, prompt_token_ids: Sequence[int],
                    sampling_params: SamplingParams, session_id: int | str | None = None,
                    keep_session: bool = False) -> None:
        """Queues a request; raises RequestError when it cannot be served."""
        self._check_request(request_id, prompt_token_ids, sampling_params, session_id)
        context = self.scheduler.session_context(session_id)
        ids = child_request_ids(request_id, sampling_params.n)
        requests = [Request.new(cid, list(prompt_token_ids), self._child_params(sampling_params, i),
                                context_token_ids=context, session_id=session_id,
                                keep_session=keep_session)
                    for i, cid in enumerate(ids)]
        for request in requests:
            self.scheduler.validate(request)
        if len(ids) > 1:
            self._children[request_id] = ids
            self._parent_of.update((cid, request_id) for cid in ids)
        for request in requests:
            self.scheduler.add_request(request)
            self._states[request.request_id] = _OutputState(IncrementalDetokenizer(
                self.tokenizer, request.token_ids[:request.num_prompt_tokens], request.sampling_params))
            if request.sampling_params.max_tokens == 0:
                self.scheduler.finish(request, "length")
                self._pending.append(self._output(request, [], None))
        self.prompt_tokens_total += len(prompt_token_ids) * len(ids)

    def _check_request(self, request_id: str, prompt_token_ids: Sequence[int],
                       params: SamplingParams, session_id: int | str | None) -> None:
        if request_id in self._children or request_id in self._states:
            raise RequestError(f"request id {request_id!r} is already in use; give each request a unique id")
        if params.stop and self.tokenizer is None:
            raise RequestError("stop strings need a tokenizer; this engine was built without one")
        if params.n > 1 and session_id is not None:
            raise RequestError("n > 1 cannot continue an interactive session; use n=1")
        bad = [t for t in prompt_token_ids if not 0 <= t < self.runner.vocab_size]
        if bad:
            raise RequestError(f"prompt token id {bad[0]} is outside the vocabulary "
                               f"(0..{self.runner.vocab_size - 1})")

    @staticmethod
    def _child_params(params: SamplingParams, index: int) -> SamplingParams:
        if params.n == 1:
            return params
        seed = None if params.seed is None else params.seed + index
        return dataclasses.replace(params, n=1, seed=seed)

    def abort_request(self, request_id: str) -> list[RequestOutput]:
        """Stops a request (all its samples) and frees its blocks; returns its final outputs."""
        outputs = []
        for cid in list(self._children.get(request_id, [request_id])):
            request = self.scheduler.abort(cid)
            if request is not None:
                outputs.append(self._output(request, [], None))
        return outputs

    def end_session(self, session_id: int | str) -> list[RequestOutput]:
        """Frees what an interactive session holds; stops its request in progress, if any,
        and returns that request's final outputs."""
        session = self.scheduler.sessions.get(session_id)
        outputs = []
        if session is not None and session.active_request_id is not None:
            self.scheduler.requests[session.active_request_id].keep_session = False
            outputs = self.abort_request(session.active_request_id)
        self.scheduler.end_session(session_id)
        return outputs

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._pending)

    def stats(self) -> EngineStats:
        return EngineStats(
            running=len(self.scheduler.running), waiting=len(self.scheduler.waiting),
            num_sessions=len(self.scheduler.sessions), kv_cache_usage=self.pool.usage,
            prefix_cache_queries=self.pool.prefix_query_tokens,
            prefix_cache_hits=self.pool.prefix_hit_tokens,
            prefix_cache_hit_rate=self.pool.prefix_hit_rate,
            prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
            num_preemptions=self.scheduler.num_preemptions,
            num_session_evictions=self.scheduler.num_session_evictions)

    # -- the step --------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        return self.finish_step(self.begin_step())

    def steps(self):
        """Steps while there is work, yielding each step's outputs; with async scheduling
        each step is scheduled and started before the previous one's tokens are read."""
        step = None
        while True:
            ahead = self.begin_step(after=step) if self.can_schedule_ahead(step) else None
            if step is not None:
                yield self.finish_step(step)
            if ahead is None:
                if not self.has_unfinished():
                    return
                ahead = self.begin_step()
            step = ahead

    def can_schedule_ahead(self, step: StepInFlight | None) -> bool:
        """Whether the next step may be scheduled while `step` runs (async scheduling):
        its tokens then reach the next step's inputs, and the token histories that
        penalties count, on the device."""
        return self.config.async_scheduling and step is not None and step.future is not None

    def begin_step(self, after: StepInFlight | None = None) -> StepInFlight:
        """Schedules and starts a step. Until `finish_step`, nothing may touch the engine
        but `begin_step(after=that step)` (see `can_schedule_ahead`), commands that add,
        abort or end requests, and `finish_step` itself, in step order."""
        outputs, self._pending = self._pending, []
        scheduled = self.scheduler.schedule()
        for request in scheduled.finished:
            logger.warning("request %s stopped: %s", request.request_id, request.error)
            outputs.append(self._output(request, [], None))
        chunks = scheduled.scheduled
        if not chunks:
            return StepInFlight(outputs)
        fed_rows = pending_rows = None
        if after is not None and after.requests:
            row_of = {id(r): i for i, r in enumerate(after.requests)}
            fed_rows = [row_of[id(c.request)] if c.last_token_pending else -1 for c in chunks]
            pending_rows = [row for c, row in zip(chunks, fed_rows) if c.wants_logits]
        batch = ForwardBatch.build(
            [c.token_ids for c in chunks], [c.context_len for c in chunks],
            [c.request.block_ids for c in chunks], self.runner.block_size,
            [c.wants_logits for c in chunks], fed_rows)
        requests = [c.request for c in chunks if c.wants_logits]
        sampling = SamplingBatch.build(requests, self.runner.vocab_size,
                                       pending_rows=pending_rows) if requests else None
        future = self.runner.submit_step(batch, sampling)
        for chunk in chunks:  # their K/V are on the way: the next step may build on them
            chunk.request.num_computed_tokens += chunk.num_new_tokens
        for request in requests:
            request.num_pending += 1
        return StepInFlight(outputs, chunks, requests, future)

    def finish_step(self, step: StepInFlight) -> list[RequestOutput]:
        """Waits for the step's tokens; one RequestOutput per request that advanced or ended.
        The token of a request that ended meanwhile (it stopped on the token before, or was
        aborted) is dropped."""
        if step.future is None:
            return step.outputs
        sampled = step.future.result()  # also when nothing was sampled: steps end in order
        if not step.requests:
            return step.outputs
        token_ids = sampled.token_ids.tolist()
        logprobs = _logprob_rows(sampled, token_ids)
        outputs = step.outputs
        for request, token_id, logprob in zip(step.requests, token_ids, logprobs):
            request.num_pending -= 1
            if not request.is_finished:
                outputs.append(self._append_token(request, token_id, logprob))
        return outputs

    def _append_token(self, request: Request, token_id: int,
                      logprob: TokenLogprob | None) -> RequestOutput:
        request.append_token(token_id)
        self.generation_tokens_total += 1
        params = request.sampling_params
        if params.logprobs is None:
            logprob = None
        if logprob is not None:
            logprob.top = logprob.top[:params.logprobs]
            self._states[request.request_id].logprobs.append(logprob)
        reason = stop_reason(token_id, request.num_output_tokens, request.num_tokens, params,
                             self.eos_token_ids, self.config.session_len)
        if reason != "stop":  # a stop or eos token ends the text without adding its own
            if self._states[request.request_id].detokenizer.add_tokens([token_id]) is not None:
                reason = "stop"
        if reason is not None:
            self.scheduler.finish(request, reason)
        return self._output(request, [token_id], logprob)

    def _output(self, request: Request, new_token_ids: list[int],
                logprob: TokenLogprob | None) -> RequestOutput:
        finished = request.is_finished
        state = self._states.pop(request.request_id) if finished else self._states[request.request_id]
        if finished:
            state.detokenizer.flush()
            self._forget_parent(request.request_id)
        delta_text = state.detokenizer.take_delta(finished)
        detok, tokens = state.detokenizer, request.token_ids
        return RequestOutput(  # the cumulative fields are copied only if read
            request_id=request.request_id,
            prompt_token_ids=LazySlice(tokens, request.num_context_tokens,
                                       request.num_prompt_tokens),
            token_ids=LazySlice(tokens, request.num_prompt_tokens, len(tokens)),
            text=LazySlice(detok.text, 0, detok.num_emitted), delta_token_ids=new_token_ids,
            delta_text=delta_text, logprobs=LazySlice(state.logprobs, 0, len(state.logprobs)),
            delta_logprobs=[logprob] if logprob else [],
            finish_reason=request.finish_reason, num_cached_tokens=request.num_cached_tokens,
            index=_sample_index(request.request_id), error=request.error)

    def _forget_parent(self, child_id: str) -> None:
        parent = self._parent_of.pop(child_id, None)
        if parent is not None and all(cid not in self._states for cid in self._children.get(parent, ())):
            self._children.pop(parent, None)


def _sample_index(request_id: str) -> int:
    """i for the samples `rid[i]` of an n > 1 request, else 0."""
    if request_id.endswith("]") and "[" in request_id:
        return int(request_id.rsplit("[", 1)[1][:-1])
    return 0


def _logprob_rows(sampled: SamplerOutput, token_ids: list[int]) -> list[TokenLogprob | None]:
    if sampled.logprobs is None:
        return [None] * len(token_ids)
    chosen = sampled.logprobs.tolist()
    if sampled.top_token_ids is None:
        return [TokenLogprob(t, lp) for t, lp in zip(token_ids, chosen)]
    tops = [list(zip(ids, lps)) for ids, lps in
            zip(sampled.top_token_ids.tolist(), sampled.top_logprobs.tolist())]
    return [TokenLogprob(t, lp, top) for t, lp, top in zip(token_ids, chosen, tops)]
