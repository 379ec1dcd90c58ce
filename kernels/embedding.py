"""Embedding lookup in a vocab-parallel table.

Each rank holds the rows [start, start + rows) of the embedding table; its
output holds those rows for the ids in its range and zeros for the rest, so the
ranks' outputs sum to the whole lookup. At batch 1 on the one-shot all-reduce
path the kernel also sends its row into the other ranks' slots
(kernels/peer_slots.py), and the joined all-reduce and norm after it only wait.
"""
from __future__ import annotations

import torch

from . import reference
from ._dispatch import HAS_TRITON, cdiv, next_pow2, use_triton
from .pdl import launch_kwargs
from .peer_slots import SendTarget

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .pdl import start
    from .peer_slots import send_row

    @triton.jit
    def _vocab_embedding_kernel(ids_ptr, w_ptr, out_ptr, first, rows, hidden, stride_w,
                                stride_o, buffers, send_offset, rank, BLOCK: tl.constexpr,
                                WORLD: tl.constexpr):
        """WORLD > 0: the row also goes to the peers' slots of a `SendTarget`."""
        start()  # kernels/pdl.py: the ids come from the kernel before
        t = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < hidden
        # the row index spread over the block (a scalar mask trips Triton's interpreter)
        local = tl.load(ids_ptr + t).to(tl.int64) - first + tl.zeros([BLOCK], tl.int64)
        inside = (local >= 0) & (local < rows)
        v = tl.load(w_ptr + local * stride_w + cols, mask=mask & inside, other=0.0)
        tl.store(out_ptr + t * stride_o + cols, v, mask=mask)
        if WORLD > 0:
            send_row(v, buffers, send_offset + t * hidden, cols, mask, rank, WORLD)


def vocab_embedding(ids: torch.Tensor, weight: torch.Tensor, first: int = 0,
                    send: SendTarget | None = None) -> torch.Tensor:
    """[*ids.shape, hidden]: weight[id - first] for ids in [first, first + rows of weight),
    zeros elsewhere. send: the rows also go to the other ranks' slots (16-bit weights,
    one id, Triton only)."""
    if send is not None and not (use_triton(weight) and weight.element_size() == 2
                                 and ids.numel() == 1):
        raise ValueError("vocab_embedding: only one 16-bit row on a GPU can be sent")
    if not use_triton(weight):
        return reference.vocab_embedding(ids, weight, first)
    flat = ids.reshape(-1)
    rows, hidden = weight.shape
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    out = torch.empty(flat.numel(), hidden, dtype=weight.dtype, device=weight.device)
    block = min(1024, next_pow2(hidden))
    buffers, offset, rank, world = send or (0, 0, 0, 0)
    if flat.numel():
        _vocab_embedding_kernel[(flat.numel(), cdiv(hidden, block))](
            flat, weight, out, first, rows, hidden, weight.stride(0), out.stride(0), buffers,
            offset, rank, BLOCK=block, WORLD=world, num_warps=4, **launch_kwargs(weight))
    return out.view(*ids.shape, hidden)
