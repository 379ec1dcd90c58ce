"""Prefill / mixed-batch attention over a paged KV cache (varlen, causal).

One program per (request, tile of BLOCK_M queries, query head). The request's
new queries sit after its cached prefix, so query row i is at position
``seq_len - q_len + i`` and sees keys up to that position (and within the
sliding window when set). Keys and values are read through the block table.
"""

from __future__ import annotations

import math

import torch

from ._dispatch import HAS_TRITON, cdiv, next_pow2

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .paged_kv import load_kv_tile, online_softmax_step

    @triton.jit
    def _prefill_kernel(
            q_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, table_ptr, seq_lens_ptr, qsl_ptr, out_ptr,
            scale_log2, window, sq_t, sq_h, so_t, so_h, s_tab, s_kb, s_ks, s_kh,
            s_sb, s_ss, s_sh, head_dim, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
            BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, PAGE: tl.constexpr,
            QUANT: tl.constexpr, HAS_WINDOW: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        tile = tl.program_id(1)
        h = tl.program_id(2)
        q_start = tl.load(qsl_ptr + b)
        q_len = tl.load(qsl_ptr + b + 1) - q_start
        if tile * BLOCK_M < q_len:
            seq_len = tl.load(seq_lens_ptr + b)
            first = seq_len - q_len + tile * BLOCK_M
            rows = tl.arange(0, BLOCK_M)
            qpos = first + rows
            rmask = tile * BLOCK_M + rows < q_len
            cols = tl.arange(0, D_PAD)
            dmask = cols < head_dim
            kvh = h // GROUP
            tok = (q_start + tile * BLOCK_M + rows).to(tl.int64)
            qmask = rmask[:, None] & dmask[None, :]
            q = tl.load(q_ptr + tok[:, None] * sq_t + h * sq_h + cols[None, :], mask=qmask,
                        other=0.0)
            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
            kv_end = tl.minimum(seq_len, first + BLOCK_M)
            kv_begin = 0
            if HAS_WINDOW:
                kv_begin = (tl.maximum(first - window + 1, 0) // BLOCK_N) * BLOCK_N
            table = table_ptr + b * s_tab
            for n0 in range(kv_begin, kv_end, BLOCK_N):
                offs = n0 + tl.arange(0, BLOCK_N)
                valid = offs < kv_end
                k = load_kv_tile(kc_ptr, ks_ptr, table, offs, valid, kvh, s_kb, s_ks, s_kh,
                                 s_sb, s_ss, s_sh, cols, dmask, PAGE, QUANT, q.dtype)
                s = tl.dot(q, tl.trans(k)) * scale_log2
                visible = valid[None, :] & (offs[None, :] <= qpos[:, None])
                if HAS_WINDOW:
                    visible = visible & (offs[None, :] > qpos[:, None] - window)
                s = tl.where(visible, s, float("-inf"))
                p, alpha, m_i, l_i = online_softmax_step(s, m_i, l_i)
                v = load_kv_tile(vc_ptr, vs_ptr, table, offs, valid, kvh, s_kb, s_ks, s_kh,
                                 s_sb, s_ss, s_sh, cols, dmask, PAGE, QUANT, q.dtype)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
            tl.store(out_ptr + tok[:, None] * so_t + h * so_h + cols[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=qmask)


def prefill_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                      max_query_len, scale, sliding_window, k_scales, v_scales) -> torch.Tensor:
    num_q, head_dim = q.shape[1], q.shape[2]
    page, num_kv = k_cache.shape[1], k_cache.shape[2]
    if q.is_cuda:
        block_m, block_n = min(64, max(16, next_pow2(max_query_len))), 64
    else:
        block_m, block_n = 16, 16
    quant = k_cache.dtype == torch.int8
    ks = k_scales if quant else k_cache
    vs = v_scales if quant else v_cache
    out = torch.empty_like(q)
    grid = (seq_lens.shape[0], cdiv(max_query_len, block_m), num_q)
    _prefill_kernel[grid](
        q, k_cache, v_cache, ks, vs, block_tables, seq_lens, query_start_loc, out,
        scale * math.log2(math.e), sliding_window or 0, q.stride(0), q.stride(1),
        out.stride(0), out.stride(1), block_tables.stride(0), k_cache.stride(0),
        k_cache.stride(1), k_cache.stride(2), ks.stride(0), ks.stride(1), ks.stride(2),
        head_dim, GROUP=num_q // num_kv, BLOCK_M=block_m, BLOCK_N=block_n,
        D_PAD=max(16, next_pow2(head_dim)), PAGE=page, QUANT=quant,
        HAS_WINDOW=sliding_window is not None, num_warps=4, num_stages=2)
    return out
