"""Batched next-token sampling on the logits' device, without host syncs.

Order of operations per row: penalties (repetition over prompt and output,
as Hugging Face's; presence and frequency over the output, as OpenAI's) ->
greedy argmax, or: divide by temperature -> top-k -> top-p -> min-p ->
exponential-race sampling, `argmax(p / E)` with `E ~ Exp(1)`, the same draw as
Gumbel-max `argmax(logits/T - log(-log U))`. A request with a seed draws E
from a generator seeded by (seed, output position), so its tokens depend
neither on what else is batched nor on where the batch is sampled (the engine
process, or tensor-parallel rank 0): a SamplingBatch is built on the CPU,
pickles small, and moves to the sampling device with `to()`.

Log-probabilities are those of the raw model distribution (log_softmax of
the logits before penalties and temperature), as vLLM reports by default.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import torch

from .tensor_dataclass import TensorDataclass
from .request import Request


@dataclass(frozen=True)
class SamplingBatch(TensorDataclass):
    """Per-row sampling options as device tensors; None where no row uses the option."""

    greedy: torch.Tensor | None  # [S] bool; None when all rows are greedy
    temperature: torch.Tensor | None  # [S] float32, 1.0 on greedy rows; None when all are
    seeds: tuple[int | None, ...]  # per row; None draws from the global generator
    steps: tuple[int, ...]  # per row: tokens the request has generated so far (incl. pending)
    all_greedy: bool
    top_k: torch.Tensor | None = None  # [S] int64, vocab size where off
    top_p: torch.Tensor | None = None  # [S] float32, 1.0 where off
    min_p: torch.Tensor | None = None  # [S] float32
    repetition_penalty: torch.Tensor | None = None  # [S] float32
    presence_penalty: torch.Tensor | None = None  # [S] float32
    frequency_penalty: torch.Tensor | None = None  # [S] float32
    seen_token_ids: torch.Tensor | None = None  # [S, L] prompt + output ids, padded with vocab size
    output_token_ids: torch.Tensor | None = None  # [S, L] output ids, padded with vocab size
    max_num_logprobs: int | None = None  # the widest top-n any row wants; None = no logprobs
    # [S] int64, with penalties under async scheduling: the row of the previous step's samples
    # that holds this row's pending token (the last column of the id tables waits for it), or -1
    pending_rows: torch.Tensor | None = None

    @classmethod
    def build(cls, requests: Sequence[Request], vocab_size: int,
              device: torch.device | str = "cpu",
              pending_rows: Sequence[int] | None = None) -> "SamplingBatch":
        """The rows' options as tensors on `device` (the CPU to ship them elsewhere).
        pending_rows[i]: where request i's pending token is among the previous step's
        samples (-1: it has none); penalties count it once `fill_pending` put it in."""
        params = [r.sampling_params for r in requests]
        greedy = [p.greedy for p in params]
        sampled = [p for p in params if not p.greedy]

        def column(values, dtype=torch.float32):
            return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

        pending = pending_rows is not None and max(pending_rows, default=-1) >= 0

        def pad(rows):
            width = max(1, max(len(row) for row in rows)) + pending  # + a slot for the pending
            padded = [row + [vocab_size] * (width - len(row)) for row in rows]
            return column(padded, torch.int64)

        rep = any(p.repetition_penalty != 1.0 for p in params)
        pres_freq = any(p.presence_penalty or p.frequency_penalty for p in params)
        logprobs = [p.logprobs for p in params if p.logprobs is not None]
        all_greedy = all(greedy)
        return cls(
            greedy=None if all_greedy else column(greedy, torch.bool),
            temperature=None if all_greedy else
            column([1.0 if p.greedy else p.temperature for p in params]),
            seeds=tuple(p.seed for p in params),
            steps=tuple(r.num_output_tokens + r.num_pending for r in requests),
            all_greedy=all_greedy,
            top_k=column([min(p.top_k or vocab_size, vocab_size) for p in params], torch.int64)
            if any(p.top_k for p in sampled) else None,
            top_p=column([p.top_p for p in params]) if any(p.top_p < 1 for p in sampled) else None,
            min_p=column([p.min_p for p in params]) if any(p.min_p > 0 for p in sampled) else None,
            repetition_penalty=column([p.repetition_penalty for p in params]) if rep else None,
            presence_penalty=column([p.presence_penalty for p in params]) if pres_freq else None,
            frequency_penalty=column([p.frequency_penalty for p in params]) if pres_freq else None,
            seen_token_ids=pad([r.token_ids for r in requests]) if rep else None,
            output_token_ids=pad([r.output_token_ids for r in requests]) if pres_freq else None,
            max_num_logprobs=max(logprobs) if logprobs else None,
            pending_rows=column(list(pending_rows), torch.int64) if pending and (rep or pres_freq)
            else None,
        )

    @property
    def plain_argmax(self) -> bool:
        """Every row's token is the argmax of its raw logits (greedy, no penalties), so
        any rank holding the same logits picks the same tokens."""
        return (self.all_greedy and self.repetition_penalty is None
                and self.presence_penalty is None and self.frequency_penalty is None)

    def fill_pending(self, last_sampled: torch.Tensor | None) -> "SamplingBatch":
        """The batch with each row's pending token (from the previous step's samples, on
        the device) in the last column of the id tables the penalties count."""
        if self.pending_rows is None:
            return self
        rows = self.pending_rows
        fill = {}
        for name in ("seen_token_ids", "output_token_ids"):
            ids = getattr(self, name)
            if ids is not None:  # the last column holds padding where a row has no pending
                fed = last_sampled.index_select(0, rows.clamp(min=0))
                ids = ids.clone()
                ids[:, -1] = torch.where(rows >= 0, fed, ids[:, -1])
                fill[name] = ids
        return dataclasses.replace(self, pending_rows=None, **fill)



@dataclass(frozen=True)
class SamplerOutput(TensorDataclass):
    token_ids: torch.Tensor  # [S] int64
    logprobs: torch.Tensor | None = None  # [S] float32, of the sampled tokens
    top_token_ids: torch.Tensor | None = None  # [S, n] int64, best first
    top_logprobs: torch.Tensor | None = None  # [S, n] float32


def sample(logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
    """logits: [S, V] float32 on device -> one token per row."""
    logits = logits.float()
    raw = logits
    logits = apply_penalties(logits, batch)
    token_ids = logits.argmax(dim=-1)
    if not batch.all_greedy:
        drawn = _sample_random(logits / batch.temperature.unsqueeze(1), batch)
        token_ids = torch.where(batch.greedy, token_ids, drawn)
    if batch.max_num_logprobs is None:
        return SamplerOutput(token_ids)
    return SamplerOutput(token_ids, *_logprobs(raw, token_ids, batch.max_num_logprobs))


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    vocab = logits.shape[1]
    if batch.repetition_penalty is not None:
        seen = _token_counts(batch.seen_token_ids, vocab) > 0
        penalty = batch.repetition_penalty.unsqueeze(1)
        penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(seen, penalized, logits)
    if batch.presence_penalty is not None:
        counts = _token_counts(batch.output_token_ids, vocab)
        logits = (logits - batch.frequency_penalty.unsqueeze(1) * counts
                  - batch.presence_penalty.unsqueeze(1) * (counts > 0).float())
    return logits


def _token_counts(padded_ids: torch.Tensor, vocab: int) -> torch.Tensor:
    counts = torch.zeros(padded_ids.shape[0], vocab + 1, device=padded_ids.device)
    counts.scatter_add_(1, padded_ids, torch.ones_like(padded_ids, dtype=counts.dtype))
    return counts[:, :vocab]


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None,
                      top_p: torch.Tensor | None) -> torch.Tensor:
    """Masks to -inf what lies outside each row's top-k, then outside its top-p nucleus."""
    if top_k is None and top_p is None:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(logits.shape[1], device=logits.device).unsqueeze(0)
    remove = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if top_k is not None:
        remove |= rank >= top_k.unsqueeze(1)
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    if top_p is not None:
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        # keep the smallest set whose mass reaches top_p; rows with top_p = 1 keep everything
        threshold = torch.where(top_p < 1, top_p, torch.full_like(top_p, float("inf")))
        remove |= (mass_before >= threshold.unsqueeze(1)) & (rank > 0)
    return logits.masked_fill(remove.scatter(1, order, remove), float("-inf"))


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    probs = logits.softmax(dim=-1)
    floor = min_p.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < floor, float("-inf"))


def _sample_random(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    logits = apply_top_k_top_p(logits, batch.top_k, batch.top_p)
    if batch.min_p is not None:
        logits = apply_min_p(logits, batch.min_p)
    probs = logits.softmax(dim=-1)
    noise = torch.empty_like(probs)
    if any(seed is None for seed in batch.seeds):
        noise.exponential_()
    for row, (seed, step) in enumerate(zip(batch.seeds, batch.steps)):
        if seed is not None:
            generator = torch.Generator(probs.device).manual_seed(_row_seed(seed, step))
            noise[row].exponential_(generator=generator)
    return (probs / noise.clamp_(min=1e-20)).argmax(dim=-1)


def _row_seed(seed: int, step: int) -> int:
    """One generator seed per (request seed, output position), spread by a 64-bit mix."""
    x = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + 1) % (1 << 64)
    x ^= x >> 31
    return (x * 0x94D049BB133111EB) % (1 << 63)


def _logprobs(raw_logits: torch.Tensor, token_ids: torch.Tensor, n: int):
    logprobs = raw_logits.log_softmax(dim=-1)
    chosen = logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1)
    if n == 0:
        return chosen, None, None
    top = logprobs.topk(n, dim=-1)
    return chosen, top.indices, top.values
