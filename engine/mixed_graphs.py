"""CUDA graphs for the steps that are not pure decodes, in pieces around attention.

A step that runs prompt chunks (alone or beside decodes) cannot replay a decode
graph, and launched eagerly its few hundred kernels cost more host time than the
GPU needs to run them: about 34 ms a step against 11 ms of GPU work for a
7B model at saturation, so the GPU sat idle a third of the time.

Everything but attention depends only on the number of tokens, so the forward is
cut at its attention calls (`DecoderModel.piece`): L + 1 pieces, each captured
once per token bucket in `bucket_sizes`, all sharing one memory pool. A step of t
tokens pads to the smallest bucket T >= t (the padding tokens write no KV, slot
-1) and replays the pieces, running each layer's attention eagerly in between on
the step's real rows: a graph replay and attention's two or three kernels a layer
instead of about fifteen launches.
The pieces hand over through static buffers (queries, attention output, residual).
With `capture=False` (CPU) the pieces run directly on the same buffers: the
padding and hand-overs are then testable without a GPU. With several ranks each
captures the same pieces, their all-reduces included, as the decode graphs do.
"""
from __future__ import annotations

import logging
import time

import torch

from .cuda_graph import warm_up
from .forward_batch import ForwardBatch
from .kv_cache import KVCache

logger = logging.getLogger(__name__)

# past this many tokens a step's GPU work outlasts the launches of an eager forward
MAX_TOKENS = 2048


def bucket_sizes(max_tokens: int) -> list[int]:
    """Token counts a graph is captured for: steps of 16 up to 64, 32 up to 256, 64 up
    to 512, 128 up to 1024, 256 beyond, at most `max_tokens` (itself included)."""
    sizes, n = [], 16
    while n < max_tokens:
        sizes.append(n)
        n += 16 if n < 64 else 32 if n < 256 else 64 if n < 512 else 128 if n < 1024 else 256
    return sizes + [max_tokens]


class MixedGraphs:
    def __init__(self, model: torch.nn.Module, kv_cache: KVCache, device: torch.device,
                 dtype: torch.dtype, max_tokens: int, capture: bool = True) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.sizes = bucket_sizes(max_tokens)
        n = self.sizes[-1]
        attn = model.layers[0].self_attn
        i64 = dict(dtype=torch.int64, device=device)
        act = dict(dtype=dtype, device=device)
        self.input_ids = torch.zeros(n, **i64)
        self.positions = torch.zeros(n, **i64)
        self.slot_mapping = torch.full((n,), -1, **i64)
        self.q = torch.zeros(n, attn.num_heads, attn.head_dim, **act)
        self.attn = torch.zeros(n, attn.num_heads * attn.head_dim, **act)
        self.residual = torch.zeros(n, model.config.hidden_size, **act)
        self.hidden = torch.zeros(n, model.config.hidden_size, **act)
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}
        if capture:
            self._capture(device)

    def _piece(self, i: int, size: int) -> None:
        """Piece i on the first `size` rows of the static buffers."""
        x = self.input_ids[:size] if i == 0 else self.attn[:size]
        residual = None if i == 0 else self.residual[:size]
        out, residual = self.model.piece(i, x, residual, self.positions[:size],
                                         self.slot_mapping[:size], self.kv_cache)
        if residual is None:
            self.hidden[:size].copy_(out)
        else:
            self.q[:size].copy_(out)
            self.residual[:size].copy_(residual)

    def _pieces(self, size: int) -> None:
        """Every piece in turn, without attention between them (capture's warm-up), and
        the logits of no rows after them, as a step of prompt chunks that end no prompt
        computes: with several ranks that ends the forward as decoder.py requires."""
        for i in range(self.model.num_pieces):
            self._piece(i, size)
        self.model.compute_logits(self.hidden[:0])

    def _capture(self, device: torch.device) -> None:
        start = time.perf_counter()
        pool = None
        for size in reversed(self.sizes):  # largest first: the others reuse its pool
            warm_up(lambda: self._pieces(size), device)
            graphs = []
            for i in range(self.model.num_pieces):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._piece(i, size)
                pool = graph.pool()
                graphs.append(graph)
            self.graphs[size] = graphs
        torch.cuda.synchronize(device)
        logger.info("captured CUDA graphs of %d pieces for steps of up to %d tokens (%d sizes) "
                    "in %.1f s", self.model.num_pieces, self.sizes[-1], len(self.sizes),
                    time.perf_counter() - start)

    def can_run(self, batch: ForwardBatch) -> bool:
        return batch.num_tokens <= self.sizes[-1]

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """The final hidden states [t, hidden] of a batch on the device; a view into a
        static buffer, valid until the next run."""
        t = batch.num_tokens
        size = next(s for s in self.sizes if s >= t)
        self.input_ids[:t].copy_(batch.input_ids)
        self.positions[:t].copy_(batch.positions)
        self.slot_mapping[:t].copy_(batch.slot_mapping)
        if size > t:  # padding rows: write no KV (their other inputs are stale, and harmless)
            self.slot_mapping[t:size].fill_(-1)
        graphs = self.graphs.get(size)
        for i in range(self.model.num_pieces):
            if i:
                self.attn[:t].copy_(self.model.attend(i - 1, self.q[:t], batch, self.kv_cache))
            if graphs:
                graphs[i].replay()
            else:
                self._piece(i, size)
        return self.hidden[:t]
