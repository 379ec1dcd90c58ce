"""Incremental detokenization and the stop conditions of a request.

Text is decoded over a short sliding window of token ids: the text added by
the newest tokens is `decode(window) - decode(window minus the new tokens)`,
which keeps the spaces that SentencePiece and byte-level tokenizers attach
to word starts. Text ending in U+FFFD (a UTF-8 character split across byte
tokens, as for Chinese or emoji) is held until the character completes.

Stop strings may span tokens. The returned text ends before the first stop
string, and nothing past it is ever streamed: the last `len(longest stop) - 1`
characters are held back until they cannot start a stop string.
"""
from __future__ import annotations

from typing import Protocol, Sequence

from .sampling_params import SamplingParams

PROMPT_WINDOW = 5  # prompt tokens decoded before the output, so its first word keeps its space
REPLACEMENT_CHAR = "\ufffd"


class Tokenizer(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """The text of one request's output, grown token by token."""

    def __init__(self, tokenizer: Tokenizer | None, prompt_token_ids: Sequence[int],
                 params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self._decode = _fast_decode(tokenizer)
        self.skip_special_tokens = params.skip_special_tokens
        self.stop = list(params.stop or [])
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        self._ids = list(prompt_token_ids[-PROMPT_WINDOW:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self.text = ""  # decoded output so far, cut before a stop string when one was found
        self._emitted = 0  # characters of self.text already handed out

    def add_tokens(self, token_ids: Sequence[int]) -> str | None:
        """Decodes new output tokens; returns the stop string they complete, if any."""
        if self.tokenizer is None or not token_ids:
            return None
        self._ids.extend(token_ids)
        new_text = self._decode_new(final=False)
        return self._append_text(new_text) if new_text else None

    def flush(self) -> None:
        """At the end of the request: decode whatever is still held (even a lone U+FFFD)."""
        if self.tokenizer is not None and self._read_offset < len(self._ids):
            self._append_text(self._decode_new(final=True))

    def take_delta(self, finished: bool) -> str:
        """The text not handed out yet that is safe to hand out (all of it once finished)."""
        end = len(self.text) if finished else max(self._emitted, len(self.text) - self._hold)
        delta = self.text[self._emitted:end]
        self._emitted = end
        return delta

    @property
    def num_emitted(self) -> int:
        """Characters of `text` handed out so far."""
        return self._emitted

    def _decode_new(self, final: bool) -> str:
        decode = self._decode
        skip = self.skip_special_tokens
        prefix = decode(self._ids[self._prefix_offset:self._read_offset], skip_special_tokens=skip)
        full = decode(self._ids[self._prefix_offset:], skip_special_tokens=skip)
        if len(full) <= len(prefix) or (full.endswith(REPLACEMENT_CHAR) and not final):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return full[len(prefix):]

    def _append_text(self, new_text: str) -> str | None:
        start = max(0, len(self.text) - self._hold)
        self.text += new_text
        found = [(self.text.find(s, start), s) for s in self.stop]
        found = [(i, s) for i, s in found if i >= 0]
        if not found:
            return None
        index, stop = min(found)
        self.text = self.text[:index]
        return stop


def _fast_decode(tokenizer: Tokenizer | None):
    """`tokenizer.decode`, or the Rust tokenizer's own when a transformers fast tokenizer
    wraps one and adds nothing to decoding (its Python layer costs more than the decode)."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None or not hasattr(backend, "decode") or \
            getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return getattr(tokenizer, "decode", None)
    return lambda ids, skip_special_tokens=False: backend.decode(
        ids, skip_special_tokens=skip_special_tokens)


def stop_reason(token_id: int, num_output_tokens: int, num_tokens: int, params: SamplingParams,
                eos_token_ids: Sequence[int], session_len: int) -> str | None:
    """Why generation ends after sampling token_id ('stop' or 'length'), or None to go on."""
    if token_id in params.stop_token_ids or (not params.ignore_eos and token_id in eos_token_ids):
        return "stop"
    if params.length_reached(num_output_tokens, num_tokens, session_len):
        return "length"
    return None
