"""Triton helper shared by the attention kernels: read a tile of paged K or V."""

from __future__ import annotations

from ._dispatch import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def load_kv_tile(cache_ptr, scales_ptr, table_ptr, offs, valid, kv_head,
                     stride_b, stride_s, stride_h, sstride_b, sstride_s, sstride_h,
                     cols, col_mask, PAGE: tl.constexpr, QUANT: tl.constexpr,
                     OUT_DTYPE: tl.constexpr):
        """[len(offs), D] rows of one kv head at token positions ``offs`` of a request.

        ``table_ptr`` points at the request's block-table row; invalid rows read as 0.
        An int8 cache is dequantized with its per-token (scale, zero point).
        """
        page = tl.load(table_ptr + offs // PAGE, mask=valid, other=0).to(tl.int64)
        in_page = (offs % PAGE).to(tl.int64)
        base = page * stride_b + in_page * stride_s + kv_head * stride_h
        mask = valid[:, None] & col_mask[None, :]
        x = tl.load(cache_ptr + base[:, None] + cols[None, :], mask=mask, other=0)
        if QUANT:
            sbase = page * sstride_b + in_page * sstride_s + kv_head * sstride_h
            scale = tl.load(scales_ptr + sbase, mask=valid, other=0).to(tl.float32)
            zp = tl.load(scales_ptr + sbase + 1, mask=valid, other=0).to(tl.float32)
            xf = x.to(tl.float32) * scale[:, None] + zp[:, None]
            x = tl.where(mask, xf, 0.0)
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
