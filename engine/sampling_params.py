"""SamplingParams: how one request's tokens are chosen and when it stops."""
from __future__ import annotations

from dataclasses import dataclass, field

from .errors import RequestError


@dataclass
class SamplingParams:
    """Per-request sampling options (the public API; names follow vLLM).

    temperature 0 means greedy. top_k 0 (or -1) and top_p 1 switch those
    filters off. stop is a string or list of strings; the returned text ends
    before the stop string. logprobs = number of top alternatives to return
    with each sampled token's log-probability (None = none).
    """

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    n: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    def validate(self) -> None:
        checks = [
            (self.max_tokens >= 0, f"max_tokens must be >= 0, got {self.max_tokens}"),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= 0, f"top_k must be >= 0 (0 or -1 = off), got {self.top_k}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.repetition_penalty > 0,
             f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (-2 <= self.presence_penalty <= 2,
             f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2 <= self.frequency_penalty <= 2,
             f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (self.logprobs is None or 0 <= self.logprobs <= 20,
             f"logprobs must be between 0 and 20, got {self.logprobs}"),
            (self.n >= 1, f"n must be >= 1, got {self.n}"),
        ]
        for ok, message in checks:
            if not ok:
                raise RequestError(message)

    def length_reached(self, num_output_tokens: int, num_tokens: int, session_len: int) -> bool:
        """Whether a request with these many output (and all) tokens must stop."""
        return num_output_tokens >= self.max_tokens or num_tokens >= session_len

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
