"""One generation request as the engine core sees it.

A request's tokens are `context + prompt + output`: the context is what an
interactive session already holds from earlier turns (empty otherwise). The
scheduler only ever asks how many of them are computed (their K/V written
to the cache) and how many remain, so prefill, chunked prefill, prefix hits,
session continuation and decode are all the same bookkeeping.
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field


from .sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    request_id: str
    token_ids: list[int]  # context + prompt, then generated tokens are appended
    num_prompt_tokens: int  # context + prompt
    num_context_tokens: int  # tokens that came from the session
    sampling_params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    session_id: int | str | None = None
    keep_session: bool = False
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    error: str | None = None  # why the engine stopped it, when it was not the request's own limits
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache (or queued to be written)
    # tokens being sampled by steps in flight: counted when scheduling, not yet in token_ids
    num_pending: int = 0
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache on admission
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # hash chain of the full blocks of token_ids

    @classmethod
    def new(cls, request_id: str, prompt_token_ids: list[int], sampling_params: SamplingParams,
            context_token_ids: list[int] | None = None, **kwargs) -> "Request":
        context = list(context_token_ids or [])
        tokens = context + list(prompt_token_ids)
        return cls(request_id=request_id, token_ids=tokens, num_prompt_tokens=len(tokens),
                   num_context_tokens=len(context), sampling_params=sampling_params, **kwargs)

    @property
    def all_token_ids(self) -> list[int]:
        return self.token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def prompt_token_ids(self) -> list[int]:
        """The prompt of this turn, without the session's context."""
        return self.token_ids[self.num_context_tokens:self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_remaining_tokens(self) -> int:
        """Tokens not yet computed: the rest of the prompt, or the last sampled token
        (which may still be pending: sampled by a step in flight)."""
        return len(self.token_ids) + self.num_pending - self.num_computed_tokens

    def length_reached(self, session_len: int) -> bool:
        """Whether the tokens pending already reach max_tokens or session_len, so that the
        request ends once they arrive and needs no further step."""
        total = len(self.token_ids) + self.num_pending
        return self.num_pending > 0 and self.sampling_params.length_reached(
            total - self.num_prompt_tokens, total, session_len)

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)


def child_request_ids(request_id: str, n: int) -> list[str]:
    """The ids the engine gives the n samples of one request (the id itself when n == 1)."""
    return [request_id] if n == 1 else [f"{request_id}[{i}]" for i in range(n)]
