"""A fake async engine, a byte-level tokenizer and a chat template for the REST tests.

The fake engine streams one byte token per step from a fixed text, starting at
an offset set by the prompt (and the seed when sampling), so answers are
deterministic; it honours max_tokens, stop strings, ignore_eos, logprobs and
sessions, and records every abort and ended session for the tests to check.
"""
from __future__ import annotations

import asyncio
import random

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

from tpserve.cluster.serving_engine import ServingEngine
from tpserve.engine.errors import RequestError
from tpserve.engine.outputs import RequestOutput, TokenLogprob
from tpserve.engine.sampling_params import SamplingParams

MODEL_ID = "fake-model"
TEXT = "the quick brown fox jumps over the lazy dog. pack my box with five dozen liquor jugs! "
EOS_AFTER = 40  # tokens before the fake model emits EOS (unless ignore_eos)


class ByteTokenizer:
    """HF-style encode/decode over a byte-level BPE with no merges (one token per byte)."""

    def __init__(self) -> None:
        alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
        tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens(["<s>", "</s>"])
        self.bos_token_id = tok.token_to_id("<s>")
        self.eos_token_id = tok.token_to_id("</s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", self.bos_token_id)])
        self._tok = tok

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)


class FakeChatTemplate:
    """Writes its own BOS text, as real templates do; has no `next_turn` (prefix diff is used)."""

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        text = "<s>" + "".join(f"<|{m['role']}|>{m['content']}\n" for m in messages)
        return text + ("<|assistant|>" if add_generation_prompt else "")


class FakeAsyncEngine:
    def __init__(self, tokenizer: ByteTokenizer, session_len: int = 512, token_delay: float = 0.001):
        self.tokenizer = tokenizer
        self.session_len = session_len
        self.token_delay = token_delay
        self.running: set[str] = set()
        self.aborted: set[str] = set()
        self.finished: set[str] = set()
        self.sessions: dict[int, int] = {}  # session id -> tokens held
        self.session_prompts: dict[int, list[list[int]]] = {}
        self.ended_sessions: list[int] = []
        self.requests: dict[str, tuple[list[int], SamplingParams]] = {}
        self.dead = False
        self.shut_down = False
        self.num_preemptions = 0  # a total the engine reports; /metrics turns it into a counter

    def _reply(self, prompt: list[int], params: SamplingParams) -> str:
        offset = sum(prompt)
        if not params.greedy:
            offset += random.Random(params.seed).randrange(len(TEXT))
        offset %= len(TEXT)
        return (TEXT[offset:] + TEXT * 8)

    async def generate(self, prompt_token_ids, sampling_params, request_id, session_id=None,
                       keep_session=False):
        held = self.sessions.get(session_id, 0) if session_id is not None else 0
        if held + len(prompt_token_ids) >= self.session_len:
            raise RequestError(f"prompt of {len(prompt_token_ids)} tokens exceeds the session length")
        self.requests[request_id] = (list(prompt_token_ids), sampling_params)
        if session_id is not None:
            self.session_prompts.setdefault(session_id, []).append(list(prompt_token_ids))
        self.running.add(request_id)
        reply = self._reply(prompt_token_ids, sampling_params)
        text, ids, finished = "", [], False
        k = sampling_params.logprobs
        try:
            for step in range(sampling_params.max_tokens + 1):
                await asyncio.sleep(self.token_delay)
                if request_id in self.aborted:
                    return
                if step == EOS_AFTER and not sampling_params.ignore_eos or step == sampling_params.max_tokens:
                    finished = True
                    yield self._out(request_id, prompt_token_ids, ids, text, [], "",
                                    "stop" if step == EOS_AFTER and not sampling_params.ignore_eos else "length", [])
                    break
                ch = reply[step]
                tid = self.tokenizer.encode(ch, add_special_tokens=False)[0]
                new_text = text + ch
                stop = next((s for s in sampling_params.stop if s in new_text), None)
                if stop is not None:
                    finished = True
                    cut = new_text[:new_text.index(stop)]
                    yield self._out(request_id, prompt_token_ids, ids + [tid], cut, [tid],
                                    cut[len(text):], "stop", [])
                    break
                lps = [] if k is None else [TokenLogprob(tid, -0.25, [(tid, -0.25), (tid + 1, -2.0)][:k])]
                ids, text = ids + [tid], new_text
                yield self._out(request_id, prompt_token_ids, ids, text, [tid], ch, None, lps)
        finally:
            self.running.discard(request_id)
            if finished:
                self.finished.add(request_id)
                if session_id is not None and keep_session:
                    self.sessions[session_id] = held + len(prompt_token_ids) + len(ids)
                elif session_id is not None:
                    self.sessions.pop(session_id, None)
            else:
                self.aborted.add(request_id)

    @staticmethod
    def _out(rid, prompt, ids, text, delta_ids, delta_text, reason, lps) -> RequestOutput:
        return RequestOutput(rid, list(prompt), token_ids=list(ids), text=text,
                             delta_token_ids=list(delta_ids), delta_text=delta_text,
                             delta_logprobs=lps, finish_reason=reason)

    def abort(self, request_id: str) -> None:
        if request_id in self.running:
            self.aborted.add(request_id)

    def end_session(self, session_id: int) -> None:
        self.sessions.pop(session_id, None)
        self.ended_sessions.append(session_id)

    def stats(self) -> dict:
        return {"running": len(self.running), "waiting": 0,
                "kv_cache_usage": len(self.running) / 64, "prefix_cache_hit_rate": 0.0,
                "num_preemptions": self.num_preemptions, "num_session_evictions": 0}

    def check_health(self) -> None:
        if self.dead:
            raise RuntimeError("engine loop died")

    def shutdown(self) -> None:
        self.shut_down = True


def make_serving(session_len: int = 512, token_delay: float = 0.001) -> ServingEngine:
    tok = ByteTokenizer()
    engine = FakeAsyncEngine(tok, session_len=session_len, token_delay=token_delay)
    return ServingEngine(engine, tok, FakeChatTemplate(), MODEL_ID, session_len)


def serving_factory(config) -> ServingEngine:
    """engine_factory for the Ray Serve test (`api_fakes:serving_factory`)."""
    options = config.engine_options
    return make_serving(session_len=int(options.get("session_len", 512)),
                        token_delay=float(options.get("token_delay", 0.001)))
