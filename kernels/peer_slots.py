"""Rows written straight into the other GPUs' memory, the data their own signal.

The one-shot all-reduce of parallel/symm_all_reduce.py gives every rank a
symmetric buffer of slots, one per (buffer half, source rank, row). An empty
slot holds -0.0 in every element; a sender writes its 16-bit values with -0.0
made +0.0, so a receiver knows a slot is full once none of its elements is -0.0.

`send_row` is that sender's side, shared by the all-reduce and gather kernels
and by the kernels that can send their output row themselves as they compute it
(the one-row GEMV of a row-parallel layer or the LM head, the embedding lookup),
so the kernel after them only waits. `take_row` is the receiver's side.
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

    @triton.jit
    def own_buffer(buffers, rank):
        """This rank's symmetric buffer, as int16 elements."""
        return tl.multiple_of(
            tl.load(buffers.to(tl.pointer_type(tl.uint64)) + rank).to(tl.pointer_type(tl.int16)),
            16)

    @triton.jit
    def take_row(slot, mask):
        """The int16 bits at `slot` (in this rank's own buffer, `own_buffer`) once a peer
        has filled them (none is -0.0), the slot emptied again for the next call."""
        # volatile: from memory each time, past the caches an earlier call filled
        got = tl.load(slot, mask=mask, other=0, volatile=True)
        while tl.max((got == EMPTY).to(tl.int32), axis=0) != 0:
            got = tl.load(slot, mask=mask, other=0, volatile=True)
        tl.store(slot, tl.full(got.shape, EMPTY, tl.int16), mask=mask)
        return got
