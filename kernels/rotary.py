"""Rotary position embedding, "rotate_half" (NeoX) style as in HF Llama.

The cache row for position p is ``[cos(p*f_0..f_{d/2-1}), sin(...)]`` times the
model's attention scaling; each frequency rotates the pair (x_i, x_{i+d/2}).

`rotate_and_store` is what an attention layer does with its new tokens: rotate
the queries and keys, and write the rotated keys and the values into the paged
KV cache (kernels/kv_cache.py), in one kernel.
"""

from __future__ import annotations

import torch

from . import reference
from ._dispatch import HAS_TRITON, next_pow2, use_triton
from .kv_cache import cache_launch_args, check_store
from .pdl import launch_kwargs

build_cos_sin_cache = reference.build_cos_sin_cache

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .kv_cache import _load_heads, _store_values
    from .pdl import start

    @triton.jit
    def _angles(cos_sin_ptr, pos, stride_c, HALF: tl.constexpr, D_PAD: tl.constexpr):
        """(cols, cos, sin, partner) of position `pos` over a head's D_PAD columns: the
        pair of column c is `partner`, and its sin is negated on the first half."""
        cols = tl.arange(0, D_PAD)
        first = cols < HALF
        freq = tl.where(first, cols, cols - HALF)
        cmask = cols < 2 * HALF
        cos = tl.load(cos_sin_ptr + pos * stride_c + freq, mask=cmask, other=0.0)
        sin = tl.load(cos_sin_ptr + pos * stride_c + HALF + freq, mask=cmask, other=0.0)
        sin = tl.where(first, -sin, sin)
        partner = tl.where(first, cols + HALF, cols - HALF)
        return cols, cos, sin, partner

    @triton.jit
    def _rotated(x_ptr, tok, stride_t, stride_h, num_heads, cos, sin, cols, partner,
                 HEADS: tl.constexpr, D_PAD: tl.constexpr, HEAD_DIM: tl.constexpr):
        """One token's heads [HEADS, D_PAD] rotated, float32: x * cos + x[partner] * sin
        (`_angles`)."""
        heads = tl.arange(0, HEADS)
        mask = (heads[:, None] < num_heads) & (cols[None, :] < HEAD_DIM)
        rows = x_ptr + tok * stride_t + heads[:, None] * stride_h
        x = tl.load(rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        other = tl.load(rows + partner[None, :], mask=mask, other=0.0).to(tl.float32)
        return x * cos[None, :] + other * sin[None, :]

    @triton.jit
    def _write_heads(x, out_ptr, tok, stride_t, stride_h, num_heads, cols,
                     HEADS: tl.constexpr, HEAD_DIM: tl.constexpr):
        """One token's heads x [HEADS, D_PAD] into out, in out's dtype."""
        heads = tl.arange(0, HEADS)
        tl.store(out_ptr + tok * stride_t + heads[:, None] * stride_h + cols[None, :],
                 x.to(out_ptr.dtype.element_ty),
                 mask=(heads[:, None] < num_heads) & (cols[None, :] < HEAD_DIM))

    @triton.jit
    def _token_queries(tok, q_ptr, qo_ptr, pos_ptr, cos_sin_ptr, sq_t, sq_h, sqo_t, sqo_h,
                       stride_c, num_q, HALF: tl.constexpr, D_PAD: tl.constexpr,
                       Q_HEADS: tl.constexpr):
        """Token tok's queries rotated into qo; returns the `_angles` of its position,
        for its keys."""
        pos = tl.load(pos_ptr + tok).to(tl.int64)
        cols, cos, sin, partner = _angles(cos_sin_ptr, pos, stride_c, HALF, D_PAD)
        q = _rotated(q_ptr, tok, sq_t, sq_h, num_q, cos, sin, cols, partner, Q_HEADS, D_PAD,
                     2 * HALF)
        _write_heads(q, qo_ptr, tok, sqo_t, sqo_h, num_q, cols, Q_HEADS, 2 * HALF)
        return cols, cos, sin, partner

    @triton.jit
    def _rotary_kernel(q_ptr, k_ptr, qo_ptr, ko_ptr, pos_ptr, cache_ptr,
                       sq_t, sq_h, sk_t, sk_h, sqo_t, sqo_h, sko_t, sko_h, stride_c,
                       num_q, num_kv, HALF: tl.constexpr, D_PAD: tl.constexpr,
                       Q_HEADS: tl.constexpr, KV_HEADS: tl.constexpr):
        tok = tl.program_id(0).to(tl.int64)
        cols, cos, sin, partner = _token_queries(
            tok, q_ptr, qo_ptr, pos_ptr, cache_ptr, sq_t, sq_h, sqo_t, sqo_h, stride_c, num_q,
            HALF, D_PAD, Q_HEADS)
        k = _rotated(k_ptr, tok, sk_t, sk_h, num_kv, cos, sin, cols, partner, KV_HEADS, D_PAD,
                     2 * HALF)
        _write_heads(k, ko_ptr, tok, sko_t, sko_h, num_kv, cols, KV_HEADS, 2 * HALF)

    @triton.jit
    def _rotary_store_kernel(q_ptr, k_ptr, v_ptr, qo_ptr, pos_ptr, cos_sin_ptr,
                             kc_ptr, vc_ptr, ks_ptr, vs_ptr, slot_ptr,
                             sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sqo_t, sqo_h, stride_c,
                             scs, sch, ssb, sss, ssh, block_size, num_q, num_kv,
                             k_scale, k_zp, v_scale, v_zp,
                             QUANT: tl.constexpr, STATIC: tl.constexpr,
                             WRITE_SCALES: tl.constexpr, HALF: tl.constexpr,
                             D_PAD: tl.constexpr, Q_HEADS: tl.constexpr,
                             KV_HEADS: tl.constexpr):
        start()  # kernels/pdl.py
        tok = tl.program_id(0).to(tl.int64)
        cols, cos, sin, partner = _token_queries(
            tok, q_ptr, qo_ptr, pos_ptr, cos_sin_ptr, sq_t, sq_h, sqo_t, sqo_h, stride_c, num_q,
            HALF, D_PAD, Q_HEADS)
        slot = tl.load(slot_ptr + tok).to(tl.int64)
        if slot >= 0:  # -1: a padding token, nothing cached
            k = _rotated(k_ptr, tok, sk_t, sk_h, num_kv, cos, sin, cols, partner, KV_HEADS,
                         D_PAD, 2 * HALF)
            # rounded to the activation dtype, as the keys apply_rotary returns are
            k = k.to(k_ptr.dtype.element_ty).to(tl.float32)
            _store_values(k, kc_ptr, ks_ptr, slot, scs, sch, ssb, sss, ssh, block_size,
                          num_kv, 2 * HALF, k_scale, k_zp, QUANT, STATIC, WRITE_SCALES,
                          KV_HEADS, D_PAD)
            v = _load_heads(v_ptr, tok, sv_t, sv_h, num_kv, 2 * HALF, KV_HEADS, D_PAD)
            _store_values(v, vc_ptr, vs_ptr, slot, scs, sch, ssb, sss, ssh, block_size,
                          num_kv, 2 * HALF, v_scale, v_zp, QUANT, STATIC, WRITE_SCALES,
                          KV_HEADS, D_PAD)


def _check(q, k, cache):
    d = q.shape[-1]
    if k.shape[-1] != d or cache.shape[-1] != d or d % 2:
        raise ValueError(f"rotary: head dims differ or are odd: q {tuple(q.shape)}, "
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
            cache.stride(0), q.shape[1], k.shape[1], HALF=half, D_PAD=next_pow2(2 * half),
            Q_HEADS=next_pow2(q.shape[1]), KV_HEADS=next_pow2(k.shape[1]), num_warps=4)
    return q_out, k_out


def rotate_and_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                     k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                     k_scales: torch.Tensor | None = None, v_scales: torch.Tensor | None = None,
                     static_params: tuple[float, float, float, float] | None = None,
                     ) -> torch.Tensor:
    """`apply_rotary` to q [T, nq, d] and k [T, nkv, d], then `store_kv_cache` of the
    rotated keys and v [T, nkv, d] (same arguments); returns the rotated queries."""
    _check(q, k, cos_sin_cache)
    check_store(k, v, k_cache, v_cache, k_scales, v_scales, static_params)
    if not use_triton(q):
        q, k = reference.apply_rotary(q, k, positions, cos_sin_cache)
        reference.store_kv_cache(k, v, k_cache, v_cache, slot_mapping, k_scales, v_scales,
                                 static_params)
        return q
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    cache = cos_sin_cache.float().contiguous()
    q_out = torch.empty_like(q)
    if q.shape[0] == 0:
        return q_out
    args, params, meta = cache_launch_args(k_cache, v_cache, k_scales, v_scales,
                                           static_params)
    half = q.shape[-1] // 2
    _rotary_store_kernel[(q.shape[0],)](
        q, k, v, q_out, positions.contiguous(), cache, *args[:4], slot_mapping,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        q_out.stride(0), q_out.stride(1), cache.stride(0), *args[4:], q.shape[1], k.shape[1],
        *params, **meta, HALF=half, D_PAD=next_pow2(2 * half),
        Q_HEADS=next_pow2(q.shape[1]), KV_HEADS=next_pow2(k.shape[1]), num_warps=4,
        **launch_kwargs(q))
    return q_out
