"""Rotary position embedding, "rotate_half" (NeoX) style as in HF Llama.

The cache row for position p is ``[cos(p*f_0..f_{d/2-1}), sin(...)]`` times the
model's attention scaling; each frequency rotates the pair (x_i, x_{i+d/2}).
"""

from __future__ import annotations

import torch

from . import reference
from ._dispatch import HAS_TRITON, next_pow2, use_triton

build_cos_sin_cache = reference.build_cos_sin_cache

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rotate_heads(x_ptr, out_ptr, tok, stride_t, stride_h, stride_ot, stride_oh,
                      num_heads, cos, sin, HALF: tl.constexpr, HALF_PAD: tl.constexpr,
                      HEADS: tl.constexpr):
        heads = tl.arange(0, HEADS)
        cols = tl.arange(0, HALF_PAD)
        mask = (heads[:, None] < num_heads) & (cols[None, :] < HALF)
        src = x_ptr + tok * stride_t + heads[:, None] * stride_h + cols[None, :]
        dst = out_ptr + tok * stride_ot + heads[:, None] * stride_oh + cols[None, :]
        x1 = tl.load(src, mask=mask, other=0.0)
        x2 = tl.load(src + HALF, mask=mask, other=0.0)
        a = x1.to(tl.float32)
        b = x2.to(tl.float32)
        tl.store(dst, (a * cos - b * sin).to(x1.dtype), mask=mask)
        tl.store(dst + HALF, (b * cos + a * sin).to(x1.dtype), mask=mask)

    @triton.jit
    def _rotary_kernel(q_ptr, k_ptr, qo_ptr, ko_ptr, pos_ptr, cache_ptr,
                       sq_t, sq_h, sk_t, sk_h, sqo_t, sqo_h, sko_t, sko_h, stride_c,
                       num_q, num_kv, HALF: tl.constexpr, HALF_PAD: tl.constexpr,
                       Q_HEADS: tl.constexpr, KV_HEADS: tl.constexpr):
        tok = tl.program_id(0).to(tl.int64)
        pos = tl.load(pos_ptr + tok).to(tl.int64)
        cols = tl.arange(0, HALF_PAD)
        cmask = cols < HALF
        cos = tl.load(cache_ptr + pos * stride_c + cols, mask=cmask, other=0.0)[None, :]
        sin = tl.load(cache_ptr + pos * stride_c + HALF + cols, mask=cmask, other=0.0)[None, :]
        _rotate_heads(q_ptr, qo_ptr, tok, sq_t, sq_h, sqo_t, sqo_h, num_q, cos, sin,
                      HALF, HALF_PAD, Q_HEADS)
        _rotate_heads(k_ptr, ko_ptr, tok, sk_t, sk_h, sko_t, sko_h, num_kv, cos, sin,
                      HALF, HALF_PAD, KV_HEADS)


def _check(q, k, cache):
    d = q.shape[-1]
    if k.shape[-1] != d or cache.shape[-1] != d or d % 2:
        raise ValueError(f"apply_rotary: head dims differ or are odd: q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, cache {tuple(cache.shape)}")


def apply_rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                 cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, nq, d] and k [T, nkv, d] by their positions; returns new tensors."""
    _check(q, k, cos_sin_cache)
    if not use_triton(q):
        return reference.apply_rotary(q, k, positions, cos_sin_cache)
    half = q.shape[-1] // 2
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    cache = cos_sin_cache.float().contiguous()
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    if q.shape[0] > 0:
        _rotary_kernel[(q.shape[0],)](
            q, k, q_out, k_out, positions.contiguous(), cache,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
            cache.stride(0), q.shape[1], k.shape[1], HALF=half, HALF_PAD=next_pow2(half),
            Q_HEADS=next_pow2(q.shape[1]), KV_HEADS=next_pow2(k.shape[1]), num_warps=4)
    return q_out, k_out
