"""Request bodies of the REST API, validated with pydantic (strict JSON types).

Field names follow the OpenAI API (chat and completions) and LMDeploy 0.1.0
(`/v1/chat/interactive`, `/v1/encode`). Unknown fields are ignored, as OpenAI
clients send many; fields tpserve cannot honour are rejected with a message.
Each request turns into the engine's `SamplingParams` with `sampling_params()`.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tpserve.engine.sampling_params import SamplingParams

from .errors_http import bad_request

Prob = Annotated[float, Field(ge=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(_Body):
    include_usage: bool = False


class _SamplingFields(_Body):
    """Sampling fields shared by chat and completions (OpenAI names plus vLLM's extras)."""

    model: str | None = None
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)
    min_p: Prob = 0.0
    repetition_penalty: float = Field(1.0, gt=0.0)
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    seed: int | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
            top_k=self.top_k, min_p=self.min_p, repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            seed=self.seed, stop=self.stop, ignore_eos=self.ignore_eos, logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict] | None = None

    @model_validator(mode="after")
    def _check(self) -> "ChatCompletionRequest":
        if self.tools:
            raise ValueError("tools / function calling is not supported by tpserve")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    max_tokens: int | None = Field(16, ge=1)

    @model_validator(mode="after")
    def _check(self) -> "CompletionRequest":
        if self.echo:
            raise ValueError("echo is not supported by tpserve; send echo: false")
        if self.suffix:
            raise ValueError("suffix (insertion) is not supported by tpserve")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt must not be empty")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompt(s) as a list: strings, or lists of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class InteractiveRequest(_Body):
    """LMDeploy 0.1.0's stateful chat: one session's KV cache lives between calls."""

    prompt: str
    session_id: int = -1
    interactive_mode: bool = False
    stream: bool = False
    stop: bool | str | list[str] | None = None
    request_output_len: int = Field(512, ge=0)
    top_p: float = Field(0.8, gt=0.0, le=1.0)
    top_k: int = Field(40, ge=-1)
    temperature: float = Field(0.8, ge=0.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    ignore_eos: bool = False

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        # LMDeploy 0.1.0 sent `stop: bool` (stop the session's running request);
        # a string or list here means stop words, as in later versions.
        stop = None if isinstance(self.stop, bool) else self.stop
        return SamplingParams(
            max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
            top_k=self.top_k, repetition_penalty=self.repetition_penalty,
            ignore_eos=self.ignore_eos, stop=stop)


class EncodeRequest(_Body):
    input: str | list[str]
    do_preprocess: bool = False
    add_bos: bool = True


def parse_body(model: type[_Body], raw: bytes) -> _Body:
    """Validate a JSON body; every failure becomes a 400 in the OpenAI shape."""
    from pydantic import ValidationError

    from .errors_http import from_validation_error

    if not raw.strip():
        raise bad_request("request body is empty; send a JSON object", code="invalid_json")
    try:
        return model.model_validate_json(raw, strict=True)
    except ValidationError as exc:
        raise from_validation_error(exc) from None
