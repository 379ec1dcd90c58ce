"""Triton helper shared by the attention kernels: read a tile of paged K or V."""

from __future__ import annotations

import os

from ._dispatch import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

    # Triton's CPU interpreter runs no PTX: there `int8_codes_f16` takes the same steps
    # in Triton's own integer operations
    _PTX = tl.constexpr(os.environ.get("TRITON_INTERPRET") != "1")

    @triton.jit
    def int8_codes_f16(x):
        """int8 codes as exact float16 values, without int-to-float conversions.

        Those run at a quarter of the integer rate on current GPUs (and int8 to bf16
        takes two), which bounds int8 attention below the memory bandwidth. Instead,
        the float16 with bits ``0x6400 | u`` is ``1024 + u`` for a byte u, so
        ``0x6400 | (c ^ 0x80) - 1152`` is c: per 4 codes, one xor, two byte
        permutes and two paired subtractions.
        """
        if _PTX:
            return tl.inline_asm_elementwise(
                asm="""{
                .reg .b32 t, k;
                xor.b32 t, $2, 0x80808080;
                mov.b32 k, 0x64806480;
                prmt.b32 $0, t, 0x64646464, 0x5140;
                prmt.b32 $1, t, 0x64646464, 0x7362;
                sub.f16x2 $0, $0, k;
                sub.f16x2 $1, $1, k;
                }""",
                constraints="=r,=r,r", args=[x], dtype=tl.float16, is_pure=True, pack=4)
        else:
            u = x.to(tl.uint8, bitcast=True).to(tl.uint16) ^ 0x6480
            return u.to(tl.float16, bitcast=True) - tl.full(x.shape, 1152.0, tl.float16)

    @triton.jit
    def load_kv_scales(scales_ptr, table_ptr, offs, valid, kv_head, sstride_b, sstride_s,
                       sstride_h, PAGE: tl.constexpr):
        """(scale, zero point) float32 [len(offs)] of an int8 cache's tokens; 0 where invalid."""
        page = tl.load(table_ptr + offs // PAGE, mask=valid, other=0).to(tl.int64)
        sbase = page * sstride_b + (offs % PAGE).to(tl.int64) * sstride_s + kv_head * sstride_h
        scale = tl.load(scales_ptr + sbase, mask=valid, other=0).to(tl.float32)
        zp = tl.load(scales_ptr + sbase + 1, mask=valid, other=0).to(tl.float32)
        return scale, zp

    @triton.jit
    def load_kv_tile(cache_ptr, scales_ptr, table_ptr, offs, valid, kv_head,
                     stride_b, stride_s, stride_h, sstride_b, sstride_s, sstride_h,
                     cols, col_mask, PAGE: tl.constexpr, QUANT: tl.constexpr,
                     OUT_DTYPE: tl.constexpr, DEQUANT: tl.constexpr = 0):
        """[len(offs), D] rows of one kv head at token positions ``offs`` of a request.

        ``table_ptr`` points at the request's block-table row; invalid rows read as 0.
        An int8 cache is dequantized with its per-token (scale, zero point): in
        float32 (DEQUANT=0), in OUT_DTYPE (1; padded columns then hold the zero
        point, harmless where the matching query or output columns are masked), or
        not at all (2: the codes, exact in OUT_DTYPE; the caller applies the
        `load_kv_scales`). 3 and 4 are 2 and 1 in float16, with the codes made by
        `int8_codes_f16`.
        """
        page = tl.load(table_ptr + offs // PAGE, mask=valid, other=0).to(tl.int64)
        in_page = (offs % PAGE).to(tl.int64)
        base = page * stride_b + in_page * stride_s + kv_head * stride_h
        mask = valid[:, None] & col_mask[None, :]
        x = tl.load(cache_ptr + base[:, None] + cols[None, :], mask=mask, other=0)
        if QUANT:
            if DEQUANT >= 3:
                x = int8_codes_f16(x)
            if DEQUANT == 4:
                scale, zp = load_kv_scales(scales_ptr, table_ptr, offs, valid, kv_head,
                                           sstride_b, sstride_s, sstride_h, PAGE)
                x = x * scale.to(tl.float16)[:, None] + zp.to(tl.float16)[:, None]
            if DEQUANT == 0:
                scale, zp = load_kv_scales(scales_ptr, table_ptr, offs, valid, kv_head,
                                           sstride_b, sstride_s, sstride_h, PAGE)
                xf = x.to(tl.float32) * scale[:, None] + zp[:, None]
                x = tl.where(mask, xf, 0.0)
            elif DEQUANT == 1:
                scale, zp = load_kv_scales(scales_ptr, table_ptr, offs, valid, kv_head,
                                           sstride_b, sstride_s, sstride_h, PAGE)
                x = (x.to(OUT_DTYPE) * scale.to(OUT_DTYPE)[:, None]
                     + zp.to(OUT_DTYPE)[:, None])
        return x.to(OUT_DTYPE)

    @triton.jit
    def online_softmax_step(s, m_i, l_i):
        """One flash-attention update with scores ``s`` in log2 units (-inf = masked).

        Returns (p, alpha, m_new, l_new); the caller adds ``p @ V`` to ``acc * alpha``.
        Rows with nothing visible yet keep m = -inf without producing NaNs.
        """
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_new = l_i * alpha + tl.sum(p, axis=1)
        return p, alpha, m_new, l_new
