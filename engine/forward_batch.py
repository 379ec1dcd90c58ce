"""The flattened batch one model forward consumes.

Every scheduled request contributes its new tokens (a prefill chunk or one
decode token) to a single token dimension T. Attention reads each request's
whole context from the paged KV cache through its block table, so prefill,
chunked prefill, prefix-cache hits and decode are the same operation.

With async scheduling a step is built while the previous one still runs, so
a decode token may not be known yet: `fed_rows` then names, per token, the
row of the previous step's sampled tokens (on the runner's device) that
gives its input id.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .tensor_dataclass import TensorDataclass


SAMPLED_BY_NONE, SAMPLED_BY_RANK0, SAMPLED_BY_ALL = 0, 1, 2


@dataclass
class ForwardBatch(TensorDataclass):
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64, absolute position of each token in its sequence
    slot_mapping: torch.Tensor  # [T] int64, block_id * block_size + offset where the token's K/V go
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0
    seq_lens: torch.Tensor  # [B] int32, context length of each request after this step
    query_start_loc: torch.Tensor  # [B + 1] int32, request b owns tokens [qsl[b], qsl[b+1])
    max_query_len: int
    max_seq_len: int
    logits_indices: torch.Tensor  # [S] int64, rows of T whose next-token logits are wanted
    # [T] int64: the previous step's sampled row that is this token, -1 where input_ids has it;
    # None when every input id is known
    fed_rows: torch.Tensor | None = None
    # the leading requests with one new token each (attention runs them as decodes)
    num_decodes: int = 0
    # at tp > 1, who samples this step's logits (SAMPLED_BY_*): rank 0 alone, or every rank
    # alike, taking the argmax of the logits every rank holds whole (see ModelRunner.follow)
    sampled_by: int = SAMPLED_BY_NONE

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens.shape[0])

    @classmethod
    def build(cls, token_ids: list[list[int]], context_lens: list[int],
              block_tables: list[list[int]], block_size: int,
              want_logits: list[bool] | None = None,
              fed_rows: list[int] | None = None) -> "ForwardBatch":
        """Builds a batch on the CPU from plain lists.

        token_ids[b]: the new tokens of request b; context_lens[b]: tokens of b
        already in the cache before them; block_tables[b]: b's block ids.
        want_logits[b]: whether b's last new token needs logits (a prefill
        chunk that does not finish the prompt does not).
        fed_rows[b]: the row of the previous step's sampled tokens that is the
        last of b's new tokens (still being sampled), or -1 when it is known.
        """
        want_logits = want_logits or [True] * len(token_ids)
        flat, pos, slots, qsl, seq_lens, logits_idx = [], [], [], [0], [], []
        for b, (toks, ctx) in enumerate(zip(token_ids, context_lens)):
            table = block_tables[b]
            n = len(toks)
            flat.extend(toks)
            if n == 1:  # decode: the common case, without the per-token loop
                pos.append(ctx)
                slots.append(table[ctx // block_size] * block_size + ctx % block_size)
            else:
                span = range(ctx, ctx + n)
                pos.extend(span)
                slots.extend(table[p // block_size] * block_size + p % block_size for p in span)
            qsl.append(len(flat))
            seq_lens.append(ctx + n)
            if want_logits[b]:
                logits_idx.append(len(flat) - 1)
        width = max(1, max((len(t) for t in block_tables), default=1))
        padded, zeros = [], [0] * width
        for t in block_tables:
            padded.extend(t)
            padded.extend(zeros[:width - len(t)])
        # one tensor from one list, then views: torch.tensor costs ~20 us a call
        sizes = [len(flat), len(pos), len(slots), len(logits_idx), len(seq_lens), len(qsl),
                 len(padded)]
        parts = torch.tensor(flat + pos + slots + logits_idx + seq_lens + qsl + padded,
                             dtype=torch.int64).split(sizes)
        return cls(
            input_ids=parts[0], positions=parts[1], slot_mapping=parts[2],
            block_tables=parts[6].view(len(block_tables), width).to(torch.int32),
            seq_lens=parts[4].to(torch.int32), query_start_loc=parts[5].to(torch.int32),
            max_query_len=max((len(t) for t in token_ids), default=0),
            max_seq_len=max(seq_lens, default=0), logits_indices=parts[3],
            fed_rows=_fed_rows(fed_rows, qsl) if fed_rows and max(fed_rows) >= 0 else None,
            num_decodes=_leading_ones(qsl))


def _leading_ones(query_start_loc: list[int]) -> int:
    """How many requests from the first have exactly one new token."""
    n = len(query_start_loc) - 1
    if query_start_loc[-1] == n:
        return n
    for b in range(n):
        if query_start_loc[b + 1] != b + 1:
            return b
    return n


def _fed_rows(rows: list[int], query_start_loc: list[int]) -> torch.Tensor:
    """[T] int64: rows[b] at the last token of request b, -1 elsewhere."""
    fed = [-1] * query_start_loc[-1]
    for b, row in enumerate(rows):
        if row >= 0:
            fed[query_start_loc[b + 1] - 1] = row
    return torch.tensor(fed, dtype=torch.int64)


def mark_sampler(batch: ForwardBatch, sampling) -> ForwardBatch:
    """The batch marked with who samples it at tp > 1 (rank 0 calls this before sending
    it to the others): every rank alike where `sampling` (a SamplingBatch) is a plain
    argmax, rank 0 alone otherwise, no rank where there is no sampling."""
    if sampling is None:
        return batch
    mark = SAMPLED_BY_ALL if sampling.plain_argmax else SAMPLED_BY_RANK0
    return dataclasses.replace(batch, sampled_by=mark)
