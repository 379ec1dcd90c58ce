"""Write new keys/values into the paged KV cache, optionally as int8.

Cache layout: ``[num_blocks, block_size, num_kv_heads, head_dim]``; token t goes
to slot ``slot_mapping[t] = block * block_size + offset`` (-1 skips the token).
An int8 cache stores a (scale, zero point) pair per token and head,
``x = q * scale + zp``: computed online (asymmetric min/max over head_dim) or
taken from calibrated ``static_params = (k_scale, k_zp, v_scale, v_zp)``. The
pairs are indexed ``[..., block, offset, head, 2]`` like the cache; `int8_scales`
lays them out head-major within a block, so that the tokens of one head that an
attention tile reads lie next to each other. The kernels take any strides. A cache
written only with calibrated parameters needs no memory per token:
`calibrated_scales` is a broadcast view of the one pair, which the writes skip.
"""

from __future__ import annotations

import torch

from . import reference
from ._dispatch import HAS_TRITON, next_pow2, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _store_values(x, cache_ptr, scales_ptr, slot, stride_cs, stride_ch, stride_sb,
                      stride_ss, stride_sh, block_size, num_heads, head_dim,
                      static_scale, static_zp, QUANT: tl.constexpr, STATIC: tl.constexpr,
                      WRITE_SCALES: tl.constexpr, HEADS: tl.constexpr, D_PAD: tl.constexpr):
        """One token's heads x [HEADS, D_PAD] (float32) into the cache at `slot`."""
        heads = tl.arange(0, HEADS)
        cols = tl.arange(0, D_PAD)
        hmask = heads < num_heads
        mask = hmask[:, None] & (cols[None, :] < head_dim)
        dst = cache_ptr + slot * stride_cs + heads[:, None] * stride_ch + cols[None, :]
        if QUANT:
            sdt = scales_ptr.dtype.element_ty
            if STATIC:
                scale = tl.zeros([HEADS], tl.float32) + static_scale
                zp = tl.zeros([HEADS], tl.float32) + static_zp
            else:
                hi = tl.max(tl.where(mask, x, float("-inf")), axis=1)
                lo = tl.min(tl.where(mask, x, float("inf")), axis=1)
                scale = (hi - lo) / 255.0
                zp = (hi + lo) / 2.0
            # quantize with the scale as stored, so dequantization matches exactly
            scale = scale.to(sdt).to(tl.float32)
            zp = zp.to(sdt).to(tl.float32)
            inv = tl.where(scale > 0, 1.0 / tl.where(scale > 0, scale, 1.0), 0.0)
            q = tl.floor((x - zp[:, None]) * inv[:, None] + 0.5)
            q = tl.minimum(tl.maximum(q, -128.0), 127.0)
            tl.store(dst, q.to(tl.int8), mask=mask)
            # the scales may be laid out head-major within a block: address (block, offset)
            sdst = (scales_ptr + (slot // block_size) * stride_sb
                    + (slot % block_size) * stride_ss + heads * stride_sh)
            if WRITE_SCALES:
                tl.store(sdst, scale.to(sdt), mask=hmask)
                tl.store(sdst + 1, zp.to(sdt), mask=hmask)
        else:
            tl.store(dst, x.to(cache_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _load_heads(x_ptr, tok, stride_xt, stride_xh, num_heads, head_dim,
                    HEADS: tl.constexpr, D_PAD: tl.constexpr):
        """One token's heads [HEADS, D_PAD] as float32 (zero past the real ones)."""
        heads = tl.arange(0, HEADS)
        cols = tl.arange(0, D_PAD)
        mask = (heads[:, None] < num_heads) & (cols[None, :] < head_dim)
        return tl.load(x_ptr + tok * stride_xt + heads[:, None] * stride_xh + cols[None, :],
                       mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _store_heads(x_ptr, cache_ptr, scales_ptr, tok, slot, stride_xt, stride_xh,
                     stride_cs, stride_ch, stride_sb, stride_ss, stride_sh, block_size,
                     num_heads, head_dim,
                     static_scale, static_zp, QUANT: tl.constexpr, STATIC: tl.constexpr,
                     WRITE_SCALES: tl.constexpr, HEADS: tl.constexpr, D_PAD: tl.constexpr):
        x = _load_heads(x_ptr, tok, stride_xt, stride_xh, num_heads, head_dim, HEADS, D_PAD)
        _store_values(x, cache_ptr, scales_ptr, slot, stride_cs, stride_ch, stride_sb,
                      stride_ss, stride_sh, block_size, num_heads, head_dim, static_scale,
                      static_zp, QUANT, STATIC, WRITE_SCALES, HEADS, D_PAD)

    @triton.jit
    def _store_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, slot_ptr,
                         skt, skh, svt, svh, scs, sch, ssb, sss, ssh, block_size,
                         num_heads, head_dim,
                         k_scale, k_zp, v_scale, v_zp, QUANT: tl.constexpr,
                         STATIC: tl.constexpr, WRITE_SCALES: tl.constexpr, HEADS: tl.constexpr,
                         D_PAD: tl.constexpr):
        tok = tl.program_id(0).to(tl.int64)
        slot = tl.load(slot_ptr + tok).to(tl.int64)
        if slot >= 0:
            _store_heads(k_ptr, kc_ptr, ks_ptr, tok, slot, skt, skh, scs, sch, ssb, sss, ssh,
                         block_size, num_heads, head_dim, k_scale, k_zp, QUANT, STATIC,
                         WRITE_SCALES, HEADS, D_PAD)
            _store_heads(v_ptr, vc_ptr, vs_ptr, tok, slot, svt, svh, scs, sch, ssb, sss, ssh,
                         block_size, num_heads, head_dim, v_scale, v_zp, QUANT, STATIC,
                         WRITE_SCALES, HEADS, D_PAD)


def int8_scales(cache_shape: tuple[int, ...], device: torch.device | str | None = None
                ) -> torch.Tensor:
    """Zeroed (scale, zero point) float32 pairs for an int8 cache of shape
    [..., num_blocks, block_size, kv_heads, head_dim]: a [..., num_blocks, block_size,
    kv_heads, 2] view of head-major storage."""
    *lead, block_size, kv_heads, _ = cache_shape
    storage = torch.zeros(*lead, kv_heads, block_size, 2, dtype=torch.float32, device=device)
    return storage.transpose(-3, -2)


def calibrated_scales(params, cache_shape: tuple[int, ...], device=None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(k_scales, v_scales) for an int8 cache of shape [..., num_blocks, block_size,
    kv_heads, head_dim] written only with calibrated parameters: ``params`` [..., 4]
    (k_scale, k_zp, v_scale, v_zp) for each leading index (e.g. each layer), seen as
    [..., num_blocks, block_size, kv_heads, 2] without memory per token. Kernels read
    the pairs through them; `store_kv_cache` leaves them as they are."""
    *lead, num_blocks, block_size, kv_heads, _ = cache_shape
    params = torch.as_tensor(params, dtype=torch.float32, device=device)
    if tuple(params.shape) != (*lead, 4):
        raise ValueError(f"calibrated_scales: params of shape {tuple(params.shape)} do not "
                         f"fit a cache of shape {tuple(cache_shape)}")
    pairs = params.reshape(*lead, 1, 1, 1, 4)
    full = (*lead, num_blocks, block_size, kv_heads, 2)
    return pairs[..., 0:2].expand(full), pairs[..., 2:4].expand(full)


def check_store(k, v, k_cache, v_cache, k_scales, v_scales, static_params):
    if k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride():
        raise ValueError("store_kv_cache: k_cache and v_cache must have the same shape and layout")
    if k.shape[1:] != k_cache.shape[2:] or v.shape != k.shape:
        raise ValueError(f"store_kv_cache: k {tuple(k.shape)} / v {tuple(v.shape)} do not "
                         f"match the cache's [heads, head_dim] {tuple(k_cache.shape[2:])}")
    nb, bs = k_cache.shape[:2]
    if k_cache.stride(0) != bs * k_cache.stride(1) or k_cache.stride(-1) != 1:
        raise ValueError("store_kv_cache: each cache's [num_blocks, block_size] dims must be "
                         "contiguous (slot = block * block_size + offset addresses them)")
    if k_cache.dtype == torch.int8:
        if k_scales is None or v_scales is None:
            raise ValueError("store_kv_cache: an int8 cache needs k_scales and v_scales")
        if k_scales.stride() != v_scales.stride():
            raise ValueError("store_kv_cache: k_scales and v_scales must share a layout")
        if static_params is None and reference.one_pair(k_scales):
            raise ValueError("store_kv_cache: scales that are one calibrated pair "
                             "(calibrated_scales) need that pair as static_params")


def store_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                   k_scales: torch.Tensor | None = None, v_scales: torch.Tensor | None = None,
                   static_params: tuple[float, float, float, float] | None = None) -> None:
    """In place: k/v [T, nkv, d] into k_cache/v_cache [nb, bs, nkv, d] at slot_mapping."""
    check_store(k, v, k_cache, v_cache, k_scales, v_scales, static_params)
    if not use_triton(k):
        reference.store_kv_cache(k, v, k_cache, v_cache, slot_mapping, k_scales,
                                 v_scales, static_params)
        return
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    if k.shape[0] == 0:
        return
    args, params, meta = cache_launch_args(k_cache, v_cache, k_scales, v_scales,
                                           static_params)
    _store_kv_kernel[(k.shape[0],)](
        k, v, *args[:4], slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        *args[4:], k.shape[1], k.shape[2], *params, **meta,
        HEADS=next_pow2(k.shape[1]), D_PAD=next_pow2(k.shape[2]), num_warps=4)


def cache_launch_args(k_cache, v_cache, k_scales, v_scales, static_params):
    """The cache side of a kernel that writes K/V (`_store_values`): pointers
    (k_cache, v_cache, k_scales, v_scales), then strides (cache slot and head;
    scales block, offset and head) and the block size; the calibrated
    (k_scale, k_zp, v_scale, v_zp) as floats (placeholders without them); and the
    constexprs."""
    quant = k_cache.dtype == torch.int8
    ks = k_scales if quant else k_cache
    vs = v_scales if quant else v_cache
    args = (k_cache, v_cache, ks, vs, k_cache.stride(1), k_cache.stride(2),
            ks.stride(0), ks.stride(1), ks.stride(2), k_cache.shape[1])
    params = [float(p) for p in (static_params if static_params is not None
                                 else (1.0, 0.0, 1.0, 0.0))]
    meta = dict(QUANT=quant, STATIC=static_params is not None,
                WRITE_SCALES=quant and not reference.one_pair(ks))  # one pair: nothing to write
    return args, params, meta
