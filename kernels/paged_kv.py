"""Triton helper shared by the attention kernels: read a tile of paged K or V."""

from __future__ import annotations

from ._dispatch import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def kv_scales_at(scales_ptr, page, in_page, valid, kv_head, sstride_b, sstride_s,
                     sstride_h):
        """(scale, zero point) float32 of an int8 cache's tokens at slot ``in_page`` of
        cache block ``page`` (int64 tensors); 0 where invalid."""
        sbase = page * sstride_b + in_page * sstride_s + kv_head * sstride_h
        scale = tl.load(scales_ptr + sbase, mask=valid, other=0).to(tl.float32)
        zp = tl.load(scales_ptr + sbase + 1, mask=valid, other=0).to(tl.float32)
        return scale, zp

    @triton.jit
    def load_kv_scales(scales_ptr, table_ptr, offs, valid, kv_head, sstride_b, sstride_s,
                       sstride_h, PAGE: tl.constexpr):
        """(scale, zero point) float32 [len(offs)] of an int8 cache's tokens at positions
        ``offs`` of a request; 0 where invalid."""
        page = tl.load(table_ptr + offs // PAGE, mask=valid, other=0).to(tl.int64)
        return kv_scales_at(scales_ptr, page, (offs % PAGE).to(tl.int64), valid, kv_head,
                            sstride_b, sstride_s, sstride_h)

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
        `load_kv_scales`).
        """
        page = tl.load(table_ptr + offs // PAGE, mask=valid, other=0).to(tl.int64)
        in_page = (offs % PAGE).to(tl.int64)
        base = page * stride_b + in_page * stride_s + kv_head * stride_h
        mask = valid[:, None] & col_mask[None, :]
        x = tl.load(cache_ptr + base[:, None] + cols[None, :], mask=mask, other=0)
        if QUANT:
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
