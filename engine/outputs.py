"""What the engine hands back for a request, whole or as increments."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token_id, logprob), best first


@dataclass
class RequestOutput:
    """The state of one request after an engine step.

    token_ids/text hold everything generated so far; delta_token_ids/delta_text
    what this step added (the streaming increment). finish_reason is None while
    running, then "stop" (eos, stop string or stop token) or "length"
    (max_tokens or the session length), or "abort". With n > 1 each sample
    is its own output: request_id `rid[i]`, index i.
    """

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    delta_text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    delta_logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    num_cached_tokens: int = 0
    index: int = 0  # which of a request's n samples this is
    error: str | None = None  # why the engine ended it early, when it did

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
