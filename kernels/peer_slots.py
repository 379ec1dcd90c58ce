"""Rows written straight into the other GPUs' memory, the data their own signal.

The one-shot all-reduce of parallel/symm_all_reduce.py gives every rank a
symmetric buffer of slots, one per (buffer half, source rank, row). An empty
slot holds -0.0 in every element; a sender writes its 16-bit values with -0.0
made +0.0, so a receiver knows a slot is full once none of its elements is -0.0.

`send_row` is that sender's side, shared by the all-reduce kernel and by the
one-row GEMV, which can send its output row itself as it computes it (a
row-parallel layer at batch 1), so the all-reduce after it only waits and sums.
"""
from __future__ import annotations

from typing import NamedTuple

from ._dispatch import HAS_TRITON


class SendTarget(NamedTuple):
    """Where a rank's row goes: `buffers` the device address of [world] uint64 pointers
    to each rank's symmetric buffer (16-bit elements), `offset` the element of this
    rank's slot for row 0 in every peer's buffer."""
    buffers: int
    offset: int
    rank: int
    world: int


if HAS_TRITON:
    import triton
    import triton.language as tl

    EMPTY = tl.constexpr(-32768)  # the bits of a 16-bit -0.0: no data has reached it

    @triton.jit
    def wire_bits(values):
        """16-bit `values` as the int16 bits a slot receives: -0.0 made +0.0."""
        bits = values.to(tl.int16, bitcast=True)
        return tl.where(bits == EMPTY, 0, bits).to(tl.int16)

    @triton.jit
    def send_row(values, buffers, offset, cols, mask, rank, WORLD: tl.constexpr):
        """Writes 16-bit `values` at element `offset + cols` of every peer's buffer
        (-0.0 as +0.0) and returns the bits sent, as int16."""
        bits = wire_bits(values)
        buffers = buffers.to(tl.pointer_type(tl.uint64))
        for peer in tl.static_range(WORLD):
            if peer != rank:
                theirs = tl.multiple_of(tl.load(buffers + peer).to(tl.pointer_type(tl.int16)), 16)
                tl.store(theirs + offset + cols, bits, mask=mask)
        return bits
