"""CUDA graphs for decode steps.

A decode step at small batch launches a few hundred small kernels; replaying
them as one captured graph removes the launch cost, which otherwise exceeds
the time the GPU needs to stream the weights. One graph is captured per batch
size in `capture_sizes` (all sharing one memory pool); a step of n requests
replays the smallest graph with room for n, its extra rows padded so that
they write no KV (slot -1) and attend to nothing (context length 0).

Graphs read their inputs from static buffers and are captured with the
context length bound `max_seq_len` (the session length), so the decode
attention kernel picks its split count from the batch shape alone and cuts
each sequence by its own length at run time.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

import torch

from .forward_batch import ForwardBatch

logger = logging.getLogger(__name__)

Forward = Callable[[ForwardBatch], torch.Tensor]  # batch -> [S, vocab] logits


def capture_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, 8, then every 16 up to max_batch_size (which is always included)."""
    sizes = [s for s in (1, 2, 4, 8) if s < max_batch_size]
    sizes += list(range(16, max_batch_size, 16))
    return sorted(set(sizes + [max_batch_size]))


def warm_up(fn: Callable[[], object], device: torch.device) -> None:
    """Runs fn once on a side stream before it is captured: compiles its kernels and
    forms its communicators outside the graph, as capture requires."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream(device).wait_stream(stream)


def is_decode_batch(batch: ForwardBatch) -> bool:
    """One new token per request, each wanting its logits."""
    n = batch.num_seqs
    return (batch.max_query_len == 1 and batch.num_tokens == n
            and batch.logits_indices.shape[0] == n)


class DecodeGraphs:
    def __init__(self, forward: Forward, device: torch.device, max_batch_size: int,
                 max_blocks_per_seq: int, max_seq_len: int) -> None:
        self.device = device
        self.sizes = capture_sizes(max_batch_size)
        self.max_seq_len = max_seq_len
        n = self.sizes[-1]
        i64 = dict(dtype=torch.int64, device=device)
        i32 = dict(dtype=torch.int32, device=device)
        self.input_ids = torch.zeros(n, **i64)
        self.positions = torch.zeros(n, **i64)
        self.slot_mapping = torch.full((n,), -1, **i64)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, **i32)
        self.seq_lens = torch.zeros(n, **i32)
        self.query_start_loc = torch.arange(n + 1, **i32)
        self.logits_indices = torch.arange(n, **i64)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._capture(forward)

    def _batch(self, size: int) -> ForwardBatch:
        return ForwardBatch(
            input_ids=self.input_ids[:size], positions=self.positions[:size],
            slot_mapping=self.slot_mapping[:size], block_tables=self.block_tables[:size],
            seq_lens=self.seq_lens[:size], query_start_loc=self.query_start_loc[:size + 1],
            max_query_len=1, max_seq_len=self.max_seq_len,
            logits_indices=self.logits_indices[:size], num_decodes=size)

    def _capture(self, forward: Forward) -> None:
        start = time.perf_counter()
        pool = None
        for size in reversed(self.sizes):  # largest first: smaller graphs reuse its pool
            batch = self._batch(size)
            warm_up(lambda: forward(batch), self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = forward(batch)
            pool = graph.pool()
            self.graphs[size] = (graph, out)
        torch.cuda.synchronize(self.device)
        logger.info("captured decode CUDA graphs for batch sizes %s in %.1f s", self.sizes,
                    time.perf_counter() - start)

    def can_run(self, batch: ForwardBatch) -> bool:
        return (is_decode_batch(batch) and batch.num_seqs <= self.sizes[-1]
                and batch.block_tables.shape[1] <= self.block_tables.shape[1]
                and batch.max_seq_len <= self.max_seq_len)

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits [n, vocab] of a decode batch (given on any device); a view into the
        graph's output, valid until the next replay."""
        n = batch.num_seqs
        size = next(s for s in self.sizes if s >= n)
        width = batch.block_tables.shape[1]
        self.input_ids[:n].copy_(batch.input_ids, non_blocking=True)
        self.positions[:n].copy_(batch.positions, non_blocking=True)
        self.slot_mapping[:n].copy_(batch.slot_mapping, non_blocking=True)
        self.seq_lens[:n].copy_(batch.seq_lens, non_blocking=True)
        self.block_tables[:n, :width].copy_(batch.block_tables, non_blocking=True)
        if size > n:  # padding rows: write no KV, attend to nothing
            self.slot_mapping[n:size].fill_(-1)
            self.seq_lens[n:size].zero_()
        graph, out = self.graphs[size]
        graph.replay()
        return out[:n]
