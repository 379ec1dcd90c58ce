"""Random kernel inputs shared by the kernel tests and benchmarks.

``make_paged_problem`` lays out requests in a shuffled paged KV cache the way
the engine does (a cached prefix already stored, new tokens still to store);
``random_awq`` builds AutoAWQ GEMM-packed weights with ``pack_awq``;
``TritonVariants`` records the kernel variants Triton compiles inside a block.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from .kv_cache import calibrated_scales, int8_scales
from .reference import AWQ_ORDER, store_kv_cache


@dataclass(frozen=True)
class PagedProblem:
    q: torch.Tensor              # [T, nq, d] queries of the new tokens
    k_new: torch.Tensor          # [T, nkv, d] keys of the new tokens (not yet stored)
    v_new: torch.Tensor
    slot_mapping: torch.Tensor   # [T] int64 cache slots of the new tokens
    k_cache: torch.Tensor        # [nb, bs, nkv, d], prefixes already stored
    v_cache: torch.Tensor
    k_scales: torch.Tensor | None
    v_scales: torch.Tensor | None
    block_tables: torch.Tensor   # [B, max_blocks] int32
    seq_lens: torch.Tensor       # [B] int32, prefix + new tokens
    query_start_loc: torch.Tensor  # [B+1] int32
    max_query_len: int
    max_seq_len: int
    static_params: tuple[float, float, float, float] | None = None  # int8, calibrated

    def attention_args(self) -> tuple:
        return (self.q, self.k_cache, self.v_cache, self.block_tables, self.seq_lens,
                self.query_start_loc, self.max_query_len, self.max_seq_len)


def _tables(seq_lens, block_size, spare_blocks, gen, device):
    counts = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(counts) + spare_blocks
    perm = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    tables = torch.zeros(len(seq_lens), max(counts), dtype=torch.int32)
    used = 0
    for b, c in enumerate(counts):
        tables[b, :c] = perm[used:used + c]
        used += c
    return tables.to(device), num_blocks


def _slots(tables, start, stop, block_size):
    pos = torch.arange(start, stop, device=tables.device)
    return tables[pos // block_size].long() * block_size + pos % block_size


def make_paged_problem(seq_lens: list[int], query_lens: list[int], num_q: int, num_kv: int,
                       head_dim: int, block_size: int, dtype=torch.float16, device="cpu",
                       int8: bool = False, seed: int = 0, spare_blocks: int = 3,
                       static_params: tuple[float, float, float, float] | None = None
                       ) -> PagedProblem:
    """Random queries, new keys/values, and prefixes stored in a paged cache (an int8
    one with per-token scales, or with the calibrated ``static_params`` and their
    `calibrated_scales`)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype=dtype, device=device)

    tables, num_blocks = _tables(seq_lens, block_size, spare_blocks, gen, device)
    cache_dtype = torch.int8 if int8 else dtype
    shape = (num_blocks, block_size, num_kv, head_dim)
    k_cache = torch.zeros(shape, dtype=cache_dtype, device=device)
    v_cache = torch.zeros(shape, dtype=cache_dtype, device=device)
    k_scales = v_scales = None
    if int8 and static_params is not None:  # as the engine keeps them: no memory per token
        k_scales, v_scales = calibrated_scales(static_params, shape, device)
    elif int8:
        k_scales, v_scales = int8_scales(shape, device), int8_scales(shape, device)
    slots_new, starts = [], [0]
    for b, (s, ql) in enumerate(zip(seq_lens, query_lens)):
        prefix = _slots(tables[b], 0, s - ql, block_size)
        store_kv_cache(randn(len(prefix), num_kv, head_dim), randn(len(prefix), num_kv, head_dim),
                       k_cache, v_cache, prefix, k_scales, v_scales, static_params)
        slots_new.append(_slots(tables[b], s - ql, s, block_size))
        starts.append(starts[-1] + ql)
    total = starts[-1]
    i32 = dict(dtype=torch.int32, device=device)
    return PagedProblem(
        q=randn(total, num_q, head_dim), k_new=randn(total, num_kv, head_dim),
        v_new=randn(total, num_kv, head_dim), slot_mapping=torch.cat(slots_new),
        k_cache=k_cache, v_cache=v_cache, k_scales=k_scales, v_scales=v_scales,
        block_tables=tables, seq_lens=torch.tensor(seq_lens, **i32),
        query_start_loc=torch.tensor(starts, **i32), max_query_len=max(query_lens),
        max_seq_len=max(seq_lens), static_params=static_params)


def pack_awq(nibbles: torch.Tensor) -> torch.Tensor:
    """[R, C] ints in 0..15 -> [R, C/8] int32 in AutoAWQ GEMM order."""
    rows, cols = nibbles.shape
    grouped = nibbles.reshape(rows, cols // 8, 8).to(torch.int64)
    packed = torch.zeros(rows, cols // 8, dtype=torch.int64, device=nibbles.device)
    for i, col in enumerate(AWQ_ORDER):
        packed |= grouped[..., col] << (4 * i)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return packed.to(torch.int32)


def random_awq(k: int, n: int, group_size: int, dtype=torch.float16, device="cpu",
               seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(qweight, scales, qzeros) of a random 4-bit weight [k, n]."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (k, n), generator=gen)
    z = torch.randint(0, 16, (k // group_size, n), generator=gen)
    s = torch.rand(k // group_size, n, generator=gen) * 0.02 + 0.002
    return (pack_awq(q).to(device), s.to(dtype=dtype, device=device),
            pack_awq(z).to(device))


class TritonVariants:
    """Records the Triton kernel variants first needed inside a `with` block: each is
    compiled (or read from Triton's disk cache) on the spot, a stall of up to seconds
    that a timed run should not contain. `available` is False (and nothing is seen)
    where this Triton has no compile hook."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []  # (kernel name, its key)
        self.available = False

    def _hook(self, *, repr: str, key=None, **_) -> bool:
        # the key: each argument's type and what was specialized on
        self.seen.append((repr.split("[", 1)[0], str(key)))
        return False  # True would skip the compile

    def __enter__(self) -> "TritonVariants":
        try:
            from triton import knobs
            self._old = knobs.runtime.jit_cache_hook
            knobs.runtime.jit_cache_hook = self._hook
            self.available = True
        except (ImportError, AttributeError):
            pass
        return self

    def __exit__(self, *exc) -> None:
        if self.available:
            from triton import knobs
            knobs.runtime.jit_cache_hook = self._old

    def summary(self) -> str:
        counts = Counter(name for name, _ in self.seen)
        return ", ".join(f"{n} x{c}" for n, c in sorted(counts.items())) or "none"
