"""The batch-1 q/k/v projection with rotary and the KV-cache write in its epilogue.

At one row an attention layer's [q | k | v] projection is a GEMV (kernels/gemv.py),
and the rotation of q and k and the write of k and v into the paged cache
(`rotary.rotate_and_store`) would be a kernel of its own after it. Here each GEMV
program takes pairs of rows (c, c + head_dim/2) of one head, the pairs a
"rotate_half" rotation mixes, so it can rotate its outputs itself: queries go to
the output, keys (rotated) and values into the cache at the token's slot. One
launch a layer fewer in the decode chain.

Only for float caches (an int8 cache's per-token scales need a whole head) and
heads without a q/k norm; `qkv_rotate_and_store` checks the rest.
"""

from __future__ import annotations

import torch

from . import reference
from ._dispatch import HAS_TRITON, cdiv, use_triton
from .kv_cache import check_store
from .pdl import launch_kwargs

# The launch (pairs: row pairs a program) is chosen by the rows of the [q | k | v]
# weight (`launch_for`). Whole-step A/B at batch 1, Llama-3-8B shape, one H200 of 2 x H200
# (docs/benchmarks.md): 6144 rows (32/8 heads, tp=1) with LAUNCH 3.85 ms a token
# against 3.93 with 2 pairs and 1024-wide tiles; 3072 rows (16/4, tp=2) with
# FEW_ROWS_LAUNCH 2.284 ms against 2.293 (2 pairs, 1024 wide) and 2.327 (LAUNCH):
# fewer programs, so each keeps more bytes in flight.
LAUNCH = dict(pairs=1, block_k=512, num_warps=2, preload=2)
FEW_ROWS_LAUNCH = dict(pairs=1, block_k=1024, num_warps=4, preload=2)
FEW_ROWS = 4096


def launch_for(rows: int) -> dict:
    """The default launch for a [q | k | v] weight of this many rows."""
    return FEW_ROWS_LAUNCH if rows < FEW_ROWS else LAUNCH

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .gemv import _dot_rows

    @triton.jit
    def _qkv_rotary_store_kernel(x_ptr, w_ptr, b_ptr, qo_ptr, pos_ptr, cos_sin_ptr,
                                 kc_ptr, vc_ptr, slot_ptr, K, stride_wn, stride_c,
                                 stride_cs, stride_ch, num_pairs, q_rows, kv_rows,
                                 HALF: tl.constexpr, PAIRS: tl.constexpr,
                                 HAS_BIAS: tl.constexpr, BLOCK_K: tl.constexpr,
                                 PRELOAD: tl.constexpr):
        # pair p is the rows (r, r + HALF) of one head: r = head * 2 * HALF + p % HALF
        i = tl.arange(0, 2 * PAIRS)
        pair = tl.program_id(0) * PAIRS + i // 2
        rows = (pair // HALF) * (2 * HALF) + pair % HALF + (i % 2) * HALF
        valid = pair < num_pairs
        dots = _dot_rows(x_ptr, w_ptr, rows, valid, K, stride_wn, 2 * PAIRS, BLOCK_K,
                         PRELOAD)
        if HAS_BIAS:
            dots += tl.load(b_ptr + rows, mask=valid, other=0.0).to(tl.float32)
        # rounded as the projection's output would be, then rotated in float32
        dtype = qo_ptr.dtype.element_ty
        a, b = tl.split(tl.reshape(dots.to(dtype).to(tl.float32), [PAIRS, 2]))
        pair = tl.program_id(0) * PAIRS + tl.arange(0, PAIRS)
        pmask = pair < num_pairs
        row = (pair // HALF) * (2 * HALF) + pair % HALF  # a's row; b's is row + HALF
        freq = pair % HALF
        pos = tl.load(pos_ptr).to(tl.int64)
        turn = pmask & (row < q_rows + kv_rows)  # queries and keys; values stay
        cos = tl.load(cos_sin_ptr + pos * stride_c + freq, mask=turn, other=1.0)
        sin = tl.load(cos_sin_ptr + pos * stride_c + HALF + freq, mask=turn, other=0.0)
        ra = a * cos - b * sin
        rb = b * cos + a * sin
        is_q = pmask & (row < q_rows)
        tl.store(qo_ptr + row, ra.to(dtype), mask=is_q)
        tl.store(qo_ptr + row + HALF, rb.to(dtype), mask=is_q)
        slot = tl.load(slot_ptr).to(tl.int64)
        if slot >= 0:  # -1: a padding token, nothing cached
            is_k = turn & (row >= q_rows)
            is_v = pmask & (row >= q_rows + kv_rows)
            kv_row = tl.where(is_v, row - q_rows - kv_rows, row - q_rows)
            dst = slot * stride_cs + (kv_row // (2 * HALF)) * stride_ch + kv_row % (2 * HALF)
            cdt = kc_ptr.dtype.element_ty
            # keys rounded to the activation dtype first, as rotate_and_store's are
            tl.store(kc_ptr + dst, ra.to(dtype).to(cdt), mask=is_k)
            tl.store(kc_ptr + dst + HALF, rb.to(dtype).to(cdt), mask=is_k)
            tl.store(vc_ptr + dst, a.to(cdt), mask=is_v)
            tl.store(vc_ptr + dst + HALF, b.to(cdt), mask=is_v)


def supports(x: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether `qkv_rotate_and_store` runs for x's row and this cache (a float one)."""
    return k_cache.is_floating_point() and x.numel() == x.shape[-1]


def qkv_rotate_and_store(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
                         num_q: int, num_kv: int, positions: torch.Tensor,
                         cos_sin_cache: torch.Tensor, k_cache: torch.Tensor,
                         v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                         pairs: int | None = None, block_k: int | None = None,
                         num_warps: int | None = None,
                         preload: int | None = None) -> torch.Tensor:
    """[q | k | v] = x [1, K] @ w [N, K].T (+ bias), then `rotate_and_store` of one
    token: returns the rotated queries [1, num_q, head_dim]; keys and values go to
    the cache at slot_mapping[0]. The launch arguments left None take `launch_for(N)`."""
    head_dim = k_cache.shape[-1]
    n = (num_q + 2 * num_kv) * head_dim
    if x.dim() != 2 or x.shape[0] != 1 or w.shape != (n, x.shape[1]) or head_dim % 2:
        raise ValueError(f"qkv_rotate_and_store: x {tuple(x.shape)} must be one row and w "
                         f"{tuple(w.shape)} [(num_q + 2 * num_kv) * head_dim, K] with "
                         f"num_q={num_q}, num_kv={num_kv}, head_dim={head_dim} (even)")
    if not supports(x, k_cache):
        raise ValueError(f"qkv_rotate_and_store: a {k_cache.dtype} cache; only float ones "
                         "(an int8 cache takes rotary.rotate_and_store)")
    if not use_triton(x):
        qkv = torch.nn.functional.linear(x, w, bias)
        q, k, v = qkv.split([num_q * head_dim, num_kv * head_dim, num_kv * head_dim], dim=-1)
        q, k = reference.apply_rotary(q.reshape(1, num_q, head_dim),
                                      k.reshape(1, num_kv, head_dim), positions, cos_sin_cache)
        reference.store_kv_cache(k, v.reshape(1, num_kv, head_dim), k_cache, v_cache,
                                 slot_mapping)
        return q
    kv = torch.empty(1, num_kv, head_dim, device="meta")  # the token's k/v, for the checks
    check_store(kv, kv, k_cache, v_cache, None, None, None)
    x = x.contiguous()
    if w.stride(1) != 1:
        w = w.contiguous()
    cache = cos_sin_cache.float().contiguous()
    q_out = torch.empty(1, num_q, head_dim, dtype=x.dtype, device=x.device)
    num_pairs = n // 2
    given = dict(pairs=pairs, block_k=block_k, num_warps=num_warps, preload=preload)
    launch = {**launch_for(n), **{k: v for k, v in given.items() if v is not None}}
    _qkv_rotary_store_kernel[(cdiv(num_pairs, launch["pairs"]),)](
        x, w, bias if bias is not None else w, q_out, positions, cache, k_cache, v_cache,
        slot_mapping, x.shape[1], w.stride(0), cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), num_pairs, num_q * head_dim, num_kv * head_dim,
        HALF=head_dim // 2, PAIRS=launch["pairs"], HAS_BIAS=bias is not None,
        BLOCK_K=launch["block_k"], PRELOAD=launch["preload"], num_warps=launch["num_warps"],
        **launch_kwargs(x))
    return q_out
