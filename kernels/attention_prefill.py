"""Prefill / mixed-batch attention over a paged KV cache (varlen, causal).

One program per (request, tile of BLOCK_M queries, query head). The request's
new queries sit after its cached prefix, so query row i is at position
``seq_len - q_len + i`` and sees keys up to that position (and within the
sliding window when set). Keys and values are read through the block table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._dispatch import HAS_TRITON, cdiv, next_pow2

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .paged_kv import load_kv_scales, load_kv_tile, online_softmax_step

    # step-to-step arguments, not specialized on: see attention_decode.PER_STEP_ARGS
    @triton.jit(do_not_specialize=("table_ptr", "seq_lens_ptr", "qsl_ptr", "s_tab"))
    def _prefill_kernel(
            q_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, table_ptr, seq_lens_ptr, qsl_ptr, out_ptr,
            scale_log2, window, sq_t, sq_h, so_t, so_h, s_tab, s_kb, s_ks, s_kh,
            s_sb, s_ss, s_sh, head_dim, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
            BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, PAGE: tl.constexpr,
            QUANT: tl.constexpr, HAS_WINDOW: tl.constexpr, DEQUANT: tl.constexpr):
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
            # DEQUANT=2 folds each key's (scale, zero point) into the scores, as the
            # decode kernel does: q . (c * scale + zp) = scale * (q . c) + zp * sum(q);
            # 3 each value's into the weights: p . (c * scale + zp) = (p * scale) . c
            # + sum(p * zp), the codes exact in the dot and the pairs kept in float32
            FOLD: tl.constexpr = QUANT and DEQUANT == 2
            FOLD_V: tl.constexpr = QUANT and DEQUANT == 3
            K_MODE: tl.constexpr = 2 if FOLD else (1 if FOLD_V else DEQUANT)
            V_MODE: tl.constexpr = 1 if FOLD else (2 if FOLD_V else DEQUANT)
            q_sum = tl.sum(q.to(tl.float32), axis=1)
            z_acc = tl.zeros([BLOCK_M], tl.float32)  # sum of p * value zero point
            kv_end = tl.minimum(seq_len, first + BLOCK_M)
            kv_begin = 0
            if HAS_WINDOW:
                kv_begin = (tl.maximum(first - window + 1, 0) // BLOCK_N) * BLOCK_N
            table = table_ptr + b * s_tab
            for n0 in range(kv_begin, kv_end, BLOCK_N):
                offs = n0 + tl.arange(0, BLOCK_N)
                valid = offs < kv_end
                k = load_kv_tile(kc_ptr, ks_ptr, table, offs, valid, kvh, s_kb, s_ks, s_kh,
                                 s_sb, s_ss, s_sh, cols, dmask, PAGE, QUANT, q.dtype, K_MODE)
                s = tl.dot(q, tl.trans(k))
                if FOLD:
                    k_scale, k_zp = load_kv_scales(ks_ptr, table, offs, valid, kvh, s_sb,
                                                   s_ss, s_sh, PAGE)
                    s = s * k_scale[None, :] + q_sum[:, None] * k_zp[None, :]
                s = s * scale_log2
                visible = valid[None, :] & (offs[None, :] <= qpos[:, None])
                if HAS_WINDOW:
                    visible = visible & (offs[None, :] > qpos[:, None] - window)
                s = tl.where(visible, s, float("-inf"))
                p, alpha, m_i, l_i = online_softmax_step(s, m_i, l_i)
                v = load_kv_tile(vc_ptr, vs_ptr, table, offs, valid, kvh, s_kb, s_ks, s_kh,
                                 s_sb, s_ss, s_sh, cols, dmask, PAGE, QUANT, q.dtype, V_MODE)
                if FOLD_V:
                    v_scale, v_zp = load_kv_scales(vs_ptr, table, offs, valid, kvh, s_sb,
                                                   s_ss, s_sh, PAGE)
                    z_acc = z_acc * alpha + tl.sum(p * v_zp[None, :], axis=1)
                    p = p * v_scale[None, :]
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            if FOLD_V:
                acc += z_acc[:, None]
            out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
            tl.store(out_ptr + tok[:, None] * so_t + h * so_h + cols[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=qmask)


@dataclass(frozen=True)
class PrefillLaunch:
    """The prefill kernel's launch: keys per tile, warps, pipeline stages, a register
    cap for ptxas, and for an int8 cache how it dequantizes (`paged_kv.load_kv_tile`'s
    DEQUANT: 0 in float32, 1 in the query's dtype, 2 keys folded into the scores and
    values as 1, 3 keys as 1 and values folded into the weights). Queries per tile: the
    longest query's length rounded up to a power of two, between 16 and max_block_m."""
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2
    dequant: int = 0
    maxnreg: int | None = None
    max_block_m: int = 64


DEFAULT_PREFILL_LAUNCH = PrefillLaunch()
# int8: the values' pairs folded into the weights (3), 128 keys a tile, 3 stages. One
# H200, 32 heads, µs against the float32 dequantization of 64-key tiles (0, the earlier
# default), the query's dtype (1) and the bf16 cache: 305 against 441, 274 and 246 for 4
# chunks of 512 after 1536 cached tokens; 53 against 72, 48 and 49 for 16 chunks of 64
# after 448; 215 against 192 and 167 for one prompt of 2048. 1 is faster but rounds each
# token's (scale, zero point) to bf16 first, an error a GPU test caught; 3 keeps them in
# float32. Folding the keys' pairs into the scores (2), 8 warps, 128-query tiles and
# register caps of 168-200 were slower.
INT8_PREFILL_LAUNCH = PrefillLaunch(block_n=128, num_stages=3, dequant=3)
_CPU_PREFILL_LAUNCH = PrefillLaunch(block_n=16, max_block_m=16)


def prefill_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                      max_query_len, scale, sliding_window, k_scales, v_scales,
                      launch: PrefillLaunch | None = None) -> torch.Tensor:
    num_q, head_dim = q.shape[1], q.shape[2]
    page, num_kv = k_cache.shape[1], k_cache.shape[2]
    quant = k_cache.dtype == torch.int8
    if launch is None:
        launch = (_CPU_PREFILL_LAUNCH if not q.is_cuda
                  else INT8_PREFILL_LAUNCH if quant else DEFAULT_PREFILL_LAUNCH)
    block_m = min(launch.max_block_m, max(16, next_pow2(max_query_len)))
    ks = k_scales if quant else k_cache
    vs = v_scales if quant else v_cache
    out = torch.empty_like(q)
    grid = (seq_lens.shape[0], cdiv(max_query_len, block_m), num_q)
    _prefill_kernel[grid](
        q, k_cache, v_cache, ks, vs, block_tables, seq_lens, query_start_loc, out,
        scale * math.log2(math.e), sliding_window or 0, q.stride(0), q.stride(1),
        out.stride(0), out.stride(1), block_tables.stride(0), k_cache.stride(0),
        k_cache.stride(1), k_cache.stride(2), ks.stride(0), ks.stride(1), ks.stride(2),
        head_dim, GROUP=num_q // num_kv, BLOCK_M=block_m, BLOCK_N=launch.block_n,
        D_PAD=max(16, next_pow2(head_dim)), PAGE=page, QUANT=quant,
        HAS_WINDOW=sliding_window is not None, DEQUANT=launch.dequant if quant else 0,
        num_warps=launch.num_warps, num_stages=launch.num_stages, maxnreg=launch.maxnreg)
    return out
