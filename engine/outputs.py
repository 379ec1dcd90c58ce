"""What the engine hands back for a request, whole or as increments."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token_id, logprob), best first


class LazySlice:
    """`source[start:stop]` of a list or string that only grows: a snapshot that is
    copied when first read, not when taken."""

    __slots__ = ("_source", "_start", "_stop", "_value")

    def __init__(self, source, start: int, stop: int) -> None:
        self._source, self._start, self._stop, self._value = source, start, stop, None

    def get(self):
        if self._value is None:
            self._value = self._source[self._start:self._stop]
            self._source = None
        return self._value


def _read(value):
    return value.get() if isinstance(value, LazySlice) else value


_FIELDS = ("request_id", "prompt_token_ids", "token_ids", "text", "delta_token_ids", "delta_text",
           "logprobs", "delta_logprobs", "finish_reason", "num_cached_tokens", "index", "error")


class RequestOutput:
    """The state of one request after an engine step.

    token_ids/text hold everything generated so far; delta_token_ids/delta_text
    what this step added (the streaming increment). finish_reason is None while
    running, then "stop" (eos, stop string or stop token) or "length"
    (max_tokens or the session length), or "abort". With n > 1 each sample
    is its own output: request_id `rid[i]`, index i. num_cached_tokens: prompt
    tokens served from the prefix cache; error: why the engine ended the request
    early, when it did.

    prompt_token_ids, token_ids, text and logprobs may be given as a `LazySlice` of
    the engine's growing buffers: they are copied when read. (Copying them on every step cost
    each request time in proportion to its length, every step.)
    """

    __slots__ = ("request_id", "_prompt_token_ids", "_token_ids", "_text", "delta_token_ids",
                 "delta_text", "_logprobs", "delta_logprobs", "finish_reason",
                 "num_cached_tokens", "index", "error")

    def __init__(self, request_id: str, prompt_token_ids: list[int] | LazySlice,
                 token_ids: list[int] | LazySlice | None = None, text: str | LazySlice = "",
                 delta_token_ids: list[int] | None = None, delta_text: str = "",
                 logprobs: list[TokenLogprob] | LazySlice | None = None,
                 delta_logprobs: list[TokenLogprob] | None = None,
                 finish_reason: str | None = None, num_cached_tokens: int = 0, index: int = 0,
                 error: str | None = None) -> None:
        self.request_id = request_id
        self._prompt_token_ids = prompt_token_ids
        self._token_ids = [] if token_ids is None else token_ids
        self._text = text
        self.delta_token_ids = [] if delta_token_ids is None else delta_token_ids
        self.delta_text = delta_text
        self._logprobs = [] if logprobs is None else logprobs
        self.delta_logprobs = [] if delta_logprobs is None else delta_logprobs
        self.finish_reason = finish_reason
        self.num_cached_tokens = num_cached_tokens
        self.index = index
        self.error = error

    @property
    def prompt_token_ids(self) -> list[int]:
        return _read(self._prompt_token_ids)

    @property
    def token_ids(self) -> list[int]:
        return _read(self._token_ids)

    @property
    def text(self) -> str:
        return _read(self._text)

    @property
    def logprobs(self) -> list[TokenLogprob]:
        return _read(self._logprobs)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def __eq__(self, other) -> bool:
        if not isinstance(other, RequestOutput):
            return NotImplemented
        return all(getattr(self, f) == getattr(other, f) for f in _FIELDS)

    def __repr__(self) -> str:
        fields = ", ".join(f"{f}={getattr(self, f)!r}" for f in _FIELDS)
        return f"RequestOutput({fields})"
