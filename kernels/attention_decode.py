"""Decode attention (one new token per request) over a paged KV cache.

Flash-decoding: the context of each request is cut into splits, one program
per (request, kv head, split) computes a partial softmax for all query heads of
that kv head (GQA heads share each K/V read), and the splits are merged by their
log-sum-exp. The split count depends only on the batch shape
and the bound ``max_seq_len``, never on tensor contents (no host sync, and a
CUDA graph captured with a large bound serves any shorter context); each
program cuts its own sequence into that many equal parts by its actual length.

Who merges: with one split, the program writes the result itself. With
MERGE_MIN_SPLITS or more (small batches) and given `arrivals` (zeroed int32
counters, one per request and kv head, that the kernel leaves zeroed:
`arrival_counters`), each program counts itself in after it stores its part, and
the last of a (request, kv head) to arrive merges the parts of the splits that
held tokens; so the step has no second kernel. Timed alone it wins where each
split reads many tiles (long contexts) and loses where it reads few; at short
contexts whole steps came out the same either way (docs/benchmarks.md).
Otherwise a reduce kernel, one program per (request, query head), merges every
split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._dispatch import HAS_TRITON, cdiv, next_pow2, num_sms
from .pdl import launch_kwargs

# Arguments that change from step to step (the block table's width, the number of
# splits, slices of a step's tensors). Triton would specialize on them (== 1, divisible
# by 16, 16-byte aligned) and compile a new variant, a stall of a second or more, the
# first time a running server meets each combination; they only address scalars here.
PER_STEP_ARGS = ("table_ptr", "seq_lens_ptr", "s_tab", "s_po_b", "s_po_h", "s_pl_b", "s_pl_h")

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .pdl import start

    from .paged_kv import kv_scales_at, load_kv_scales, load_kv_tile, online_softmax_step

    @triton.jit
    def _split_range(seq_lens_ptr, b, split, window, BLOCK_N: tl.constexpr,
                     HAS_WINDOW: tl.constexpr):
        """(first visible token, begin, end, splits that hold tokens) of request b's
        split: its visible context cut into tl.num_programs(2) equal runs of whole
        tiles; the splits from the fourth value on are empty."""
        seq_len = tl.load(seq_lens_ptr + b)
        kv_start = 0
        if HAS_WINDOW:
            kv_start = tl.maximum(seq_len - window, 0)
        first = (kv_start // BLOCK_N) * BLOCK_N
        tiles = tl.cdiv(seq_len - first, BLOCK_N)
        tiles_per_split = tl.cdiv(tiles, tl.num_programs(2))
        tokens_per_split = tiles_per_split * BLOCK_N
        begin = first + split * tokens_per_split
        used = tl.cdiv(tiles, tl.maximum(tiles_per_split, 1))
        return kv_start, begin, tl.minimum(seq_len, begin + tokens_per_split), used

    @triton.jit
    def _int8_tile_loads(kc_ptr, vc_ptr, ks_ptr, vs_ptr, table, offs, valid, kvh,
                         s_kb, s_ks, s_kh, s_sb, s_ss, s_sh, cols, dmask,
                         PAGE: tl.constexpr, STATIC: tl.constexpr):
        """Every load of one int8 tile, issued together: K and V codes and, without
        calibrated parameters, each token's (scale, zero point) for K and V."""
        page = tl.load(table + offs // PAGE, mask=valid, other=0).to(tl.int64)
        in_page = (offs % PAGE).to(tl.int64)
        base = (page * s_kb + in_page * s_ks + kvh * s_kh)[:, None] + cols[None, :]
        mask = valid[:, None] & dmask[None, :]
        k = tl.load(kc_ptr + base, mask=mask, other=0)
        v = tl.load(vc_ptr + base, mask=mask, other=0)
        k_scale = tl.zeros(offs.shape, tl.float32)
        k_zp = k_scale
        v_scale = k_scale
        v_zp = k_scale
        if not STATIC:
            k_scale, k_zp = kv_scales_at(ks_ptr, page, in_page, valid, kvh, s_sb, s_ss, s_sh)
            v_scale, v_zp = kv_scales_at(vs_ptr, page, in_page, valid, kvh, s_sb, s_ss, s_sh)
        return k, v, k_scale, k_zp, v_scale, v_zp

    @triton.jit(do_not_specialize=PER_STEP_ARGS)
    def _decode_split_kernel(
            q_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, table_ptr, seq_lens_ptr, po_ptr, pl_ptr,
            o_ptr, arrivals_ptr, scale_log2, window, sq_t, sq_h, s_tab, s_kb, s_ks, s_kh,
            s_sb, s_ss, s_sh, s_po_b, s_po_h, s_po_s, s_pl_b, s_pl_h, so_t, so_h, head_dim,
            k_scale_c, k_zp_c, v_scale_c, v_zp_c, MERGE: tl.constexpr, CHUNK: tl.constexpr,
            GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, GROUP_P2: tl.constexpr,
            D_PAD: tl.constexpr,
            BLOCK_N: tl.constexpr, PAGE: tl.constexpr, QUANT: tl.constexpr,
            HAS_WINDOW: tl.constexpr, DEQUANT: tl.constexpr, STATIC: tl.constexpr,
            PREFETCH: tl.constexpr):
        start()  # kernels/pdl.py
        b = tl.program_id(0).to(tl.int64)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        kv_start, begin, end, used = _split_range(seq_lens_ptr, b, split, window, BLOCK_N,
                                                  HAS_WINDOW)

        g = tl.arange(0, GROUP_PAD)
        heads = kvh * GROUP + g
        cols = tl.arange(0, D_PAD)
        dmask = cols < head_dim
        qmask = (g[:, None] < GROUP) & dmask[None, :]
        q = tl.load(q_ptr + b * sq_t + heads[:, None] * sq_h + cols[None, :], mask=qmask,
                    other=0.0)
        m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, D_PAD], tl.float32)
        table = table_ptr + b * s_tab
        # DEQUANT=2 folds each key's (scale, zero point) into its scores:
        # q . (c * scale + zp) = scale * (q . c) + zp * sum(q), exact codes c in the dot.
        # STATIC (one calibrated pair per layer for K and one for V) reads no per-token
        # scales: the keys' pair applies to the scores as above, and the values' to the
        # output, p @ (c * scale + zp) / l = scale * (p @ c) / l + zp.
        q_sum = tl.sum(q.to(tl.float32), axis=1)
        CODES: tl.constexpr = QUANT and (STATIC or DEQUANT == 2)
        # PREFETCH (int8 codes only): all of a tile's loads are issued before its math
        EARLY: tl.constexpr = CODES and PREFETCH
        for n0 in range(begin, end, BLOCK_N):
            offs = n0 + tl.arange(0, BLOCK_N)
            valid = (offs < end) & (offs >= kv_start)
            if EARLY:
                kr, vr, ksc, kzp, vsc, vzp = _int8_tile_loads(
                    kc_ptr, vc_ptr, ks_ptr, vs_ptr, table, offs, valid, kvh, s_kb, s_ks,
                    s_kh, s_sb, s_ss, s_sh, cols, dmask, PAGE, STATIC)
                k = kr.to(q.dtype)
            else:
                k = load_kv_tile(kc_ptr, ks_ptr, table, offs, valid, kvh, s_kb, s_ks, s_kh,
                                 s_sb, s_ss, s_sh, cols, dmask, PAGE, QUANT, q.dtype,
                                 2 if CODES else DEQUANT)
            s = tl.dot(q, tl.trans(k))
            if STATIC:
                s = s * k_scale_c + q_sum[:, None] * k_zp_c
            elif EARLY:
                s = s * ksc[None, :] + q_sum[:, None] * kzp[None, :]
            elif CODES:
                k_scale, k_zp = load_kv_scales(ks_ptr, table, offs, valid, kvh, s_sb, s_ss,
                                               s_sh, PAGE)
                s = s * k_scale[None, :] + q_sum[:, None] * k_zp[None, :]
            s = s * scale_log2
            s = tl.where(valid[None, :], s, float("-inf"))
            p, alpha, m_i, l_i = online_softmax_step(s, m_i, l_i)
            if EARLY:
                v = vr.to(q.dtype)
                if not STATIC:
                    v = v * vsc.to(q.dtype)[:, None] + vzp.to(q.dtype)[:, None]
            else:
                v = load_kv_tile(vc_ptr, vs_ptr, table, offs, valid, kvh, s_kb, s_ks, s_kh,
                                 s_sb, s_ss, s_sh, cols, dmask, PAGE, QUANT, q.dtype,
                                 2 if STATIC else (DEQUANT + 1) // 2)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)

        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        if STATIC:
            out = out * v_scale_c + tl.where(l_i > 0, v_zp_c, 0.0)[:, None]
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        _finish_split(out, lse, heads, g < GROUP, cols, dmask, b, used, po_ptr, pl_ptr, o_ptr,
                      arrivals_ptr, s_po_b, s_po_h, s_po_s, s_pl_b, s_pl_h, so_t, so_h,
                      head_dim, GROUP, GROUP_P2, CHUNK, D_PAD, MERGE)

    @triton.jit
    def _codes_to_units(c, ASM: tl.constexpr):
        """int8 codes -> floats 1 + (c + 128) * 2^-15, with no int-to-float conversion (a
        slow unit on GPUs): the byte c + 128 set into mantissa bits 8-15 of 1.0. A dot
        product with these keeps about 16 bits for the codes' part:
        x . c = 2^15 * (x . f - sum(x)) - 128 * sum(x). ASM (compiled for a GPU): one
        xor per four codes and one byte permute per code."""
        if ASM:
            return tl.inline_asm_elementwise(
                asm="""{
                .reg .b32 w;
                xor.b32 w, $4, 0x80808080;
                prmt.b32 $0, w, 0x3F800000, 0x7604;
                prmt.b32 $1, w, 0x3F800000, 0x7614;
                prmt.b32 $2, w, 0x3F800000, 0x7624;
                prmt.b32 $3, w, 0x3F800000, 0x7634;
                }""",
                constraints="=r,=r,=r,=r,r", args=[c], dtype=tl.float32, is_pure=True,
                pack=4)
        else:  # the same bits with portable ops (Triton's CPU interpreter)
            return (((c.to(tl.int32) + 128) << 8) | 0x3F800000).to(tl.float32, bitcast=True)

    @triton.jit(do_not_specialize=PER_STEP_ARGS)
    def _decode_mha_int8_kernel(
            q_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, table_ptr, seq_lens_ptr, po_ptr, pl_ptr,
            o_ptr, arrivals_ptr, scale_log2, window, sq_t, sq_h, s_tab, s_kb, s_ks, s_kh,
            s_sb, s_ss, s_sh, s_po_b, s_po_h, s_po_s, s_pl_b, s_pl_h, so_t, so_h, head_dim,
            k_scale_c, k_zp_c, v_scale_c, v_zp_c, MERGE: tl.constexpr, CHUNK: tl.constexpr,
            D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
            HAS_WINDOW: tl.constexpr, STATIC: tl.constexpr, ROWS: tl.constexpr,
            ASM: tl.constexpr):
        """`_decode_split_kernel` for an int8 cache with one query head per kv head (MHA):
        with a single query row, tensor-core tiles would be 15/16 padding and their
        operand copies cost registers, so the dot products run on CUDA cores, over the
        codes as `_codes_to_units` floats (two instructions a code with the FMA). Each
        key's (scale, zero point) applies to its score, each value's scale to its
        weight and its zero point to the output: p . (c * s + z) = (p * s) . c + p . z.
        The values' weighted sum is kept for ROWS tile rows (those the tile's layout
        spreads over threads) and summed over them once at the end."""
        start()  # kernels/pdl.py
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        split = tl.program_id(2)
        kv_start, begin, end, used = _split_range(seq_lens_ptr, b, split, window, BLOCK_N,
                                                  HAS_WINDOW)
        cols = tl.arange(0, D_PAD)
        dmask = cols < head_dim
        q = tl.load(q_ptr + b * sq_t + h * sq_h + cols, mask=dmask, other=0.0).to(tl.float32)
        q_sum = tl.sum(q, axis=0)
        m_i = tl.full([1], float("-inf"), tl.float32)
        l_i = tl.zeros([1], tl.float32)
        w_i = tl.zeros([1], tl.float32)  # sum of the weights given to the value units
        z_acc = tl.zeros([1], tl.float32)  # sum of p * value zero point (per-token scales)
        acc = tl.zeros([ROWS, D_PAD], tl.float32)
        table = table_ptr + b * s_tab
        for n0 in range(begin, end, BLOCK_N):
            offs = n0 + tl.arange(0, BLOCK_N)
            valid = (offs < end) & (offs >= kv_start)
            kc, vc, k_scale, k_zp, v_scale, v_zp = _int8_tile_loads(
                kc_ptr, vc_ptr, ks_ptr, vs_ptr, table, offs, valid, h, s_kb, s_ks, s_kh,
                s_sb, s_ss, s_sh, cols, dmask, PAGE, STATIC)
            dot = tl.sum(_codes_to_units(kc, ASM) * q[None, :], axis=1)
            s = (dot - q_sum) * 32768.0 - 128.0 * q_sum  # q . codes
            if STATIC:
                s = s * k_scale_c + q_sum * k_zp_c
            else:
                s = s * k_scale + q_sum * k_zp
            s = tl.where(valid, s * scale_log2, float("-inf"))
            p, alpha, m_i, l_i = online_softmax_step(s[None, :], m_i, l_i)
            p = tl.reshape(p, [BLOCK_N])
            if not STATIC:
                z_acc = z_acc * alpha + tl.sum(p * v_zp, axis=0)
                p = p * v_scale
            w_i = w_i * alpha + tl.sum(p, axis=0)
            pv = tl.reshape(p[:, None] * _codes_to_units(vc, ASM), [BLOCK_N // ROWS, ROWS, D_PAD])
            acc = acc * alpha[:, None] + tl.sum(pv, axis=0)

        units = tl.sum(acc, axis=0)
        out = ((units - w_i) * 32768.0 - 128.0 * w_i)[None, :] + z_acc[:, None]
        out = out / tl.where(l_i > 0, l_i, 1.0)[:, None]
        if STATIC:
            out = out * v_scale_c + tl.where(l_i > 0, v_zp_c, 0.0)[:, None]
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        one = tl.arange(0, 1)
        _finish_split(out, lse, h + one, one == 0, cols, dmask, b, used, po_ptr, pl_ptr, o_ptr,
                      arrivals_ptr, s_po_b, s_po_h, s_po_s, s_pl_b, s_pl_h, so_t, so_h,
                      head_dim, 1, 1, CHUNK, D_PAD, MERGE)

    @triton.jit
    def _merge_splits(po_ptr, pl_ptr, o_ptr, b, kvh, used, s_po_b, s_po_h, s_po_s, s_pl_b,
                      s_pl_h, so_t, so_h, head_dim, GROUP: tl.constexpr, GROUP_P2: tl.constexpr,
                      CHUNK: tl.constexpr, D_PAD: tl.constexpr):
        """Merges splits [0, used) of kv head kvh's query heads of request b by their
        log-sum-exp into the output, CHUNK splits a load. The parts come from other
        programs: read past the L1 cache, which another SM's writes do not update."""
        g = tl.arange(0, GROUP_P2)
        heads = kvh * GROUP + g
        hmask = g < GROUP
        sp = tl.arange(0, CHUNK)
        cols = tl.arange(0, D_PAD)
        dmask = cols < head_dim
        m = tl.full([GROUP_P2], float("-inf"), tl.float32)
        total = tl.zeros([GROUP_P2], tl.float32)
        acc = tl.zeros([GROUP_P2, D_PAD], tl.float32)
        for s0 in range(0, used, CHUNK):
            s = s0 + sp
            smask = hmask[:, None] & (s < used)[None, :]
            lse = tl.load(pl_ptr + b * s_pl_b + heads[:, None] * s_pl_h + s[None, :],
                          mask=smask, other=float("-inf"), cache_modifier=".cg")
            o = tl.load(po_ptr + b * s_po_b + heads[:, None, None] * s_po_h
                        + s[None, :, None] * s_po_s + cols[None, None, :],
                        mask=smask[:, :, None] & dmask[None, None, :], other=0.0,
                        cache_modifier=".cg")
            m_new = tl.maximum(m, tl.max(lse, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m - m_safe)
            w = tl.exp2(lse - m_safe[:, None])
            total = total * alpha + tl.sum(w, axis=1)
            acc = acc * alpha[:, None] + tl.sum(w[:, :, None] * o, axis=1)
            m = m_new
        out = acc / tl.where(total > 0, total, 1.0)[:, None]
        tl.store(o_ptr + b * so_t + heads[:, None] * so_h + cols[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=hmask[:, None] & dmask[None, :])

    @triton.jit
    def _finish_split(out, lse, heads, hmask, cols, dmask, b, used, po_ptr, pl_ptr, o_ptr,
                      arrivals_ptr, s_po_b, s_po_h, s_po_s, s_pl_b, s_pl_h, so_t, so_h,
                      head_dim, GROUP: tl.constexpr, GROUP_P2: tl.constexpr,
                      CHUNK: tl.constexpr, D_PAD: tl.constexpr, MERGE: tl.constexpr):
        """A split program's end, its heads' softmax-weighted values `out` (normalized)
        and their log2-sum-exp `lse` in hand. MERGE 2 (the only split): `out` is the
        result. 0: the part is stored for the reduce kernel. 1: stored, then counted
        in; the last program of (b, kv head) to arrive merges (module docstring)."""
        mask = hmask[:, None] & dmask[None, :]
        if MERGE == 2:
            tl.store(o_ptr + b * so_t + heads[:, None] * so_h + cols[None, :],
                     out.to(o_ptr.dtype.element_ty), mask=mask)
        else:
            split = tl.program_id(2)
            tl.store(po_ptr + b * s_po_b + heads[:, None] * s_po_h + split * s_po_s
                     + cols[None, :], out, mask=mask)
            tl.store(pl_ptr + b * s_pl_b + heads * s_pl_h + split, lse, mask=hmask)
            if MERGE == 1:
                tl.debug_barrier()  # every thread's stores before the count (a release)
                count = arrivals_ptr + b * tl.num_programs(1) + tl.program_id(1)
                arrived = tl.atomic_add(count, 1, sem="acq_rel", scope="gpu")
                if arrived == tl.num_programs(2) - 1:
                    tl.store(count, 0)  # zeroed for the next launch
                    _merge_splits(po_ptr, pl_ptr, o_ptr, b, tl.program_id(1), used, s_po_b,
                                  s_po_h, s_po_s, s_pl_b, s_pl_h, so_t, so_h, head_dim, GROUP,
                                  GROUP_P2, CHUNK, D_PAD)

    @triton.jit(do_not_specialize=("num_splits", "s_po_b", "s_po_h", "s_pl_b", "s_pl_h"))
    def _decode_reduce_kernel(po_ptr, pl_ptr, out_ptr, num_splits, s_po_b, s_po_h, s_po_s,
                              s_pl_b, s_pl_h, so_t, so_h, head_dim, CHUNK: tl.constexpr,
                              D_PAD: tl.constexpr):
        """One program per (request, query head) merges all its splits (empty ones
        too), CHUNK of them a load: many small programs, which a separate kernel with
        few splits wants (one per kv head was slower, `docs/benchmarks.md`)."""
        start()  # kernels/pdl.py
        _merge_splits(po_ptr, pl_ptr, out_ptr, tl.program_id(0).to(tl.int64),
                      tl.program_id(1), num_splits, s_po_b, s_po_h, s_po_s, s_pl_b, s_pl_h,
                      so_t, so_h, head_dim, 1, 1, CHUNK, D_PAD)


def _num_splits(q, num_kv, max_seq_len, sliding_window, block_n) -> int:
    """Enough programs to fill the GPU twice over, and no more splits than tiles."""
    span = max_seq_len if sliding_window is None else min(max_seq_len, sliding_window)
    span = max(1, span + (0 if sliding_window is None else block_n))
    want = cdiv(2 * num_sms(q), max(1, q.shape[0] * num_kv))
    return max(1, min(cdiv(span, block_n), want, 64))


@dataclass(frozen=True)
class DecodeLaunch:
    """The split kernel's launch: keys per tile, warps, pipeline stages, and for an
    int8 cache how it dequantizes (`paged_kv.load_kv_tile`'s DEQUANT: 0 in float32,
    1 in the query's dtype, 2 keys folded into the scores and values as 1), and for
    codes read as such (dequant 2, or calibrated parameters) whether all loads of a
    tile are issued before its math (prefetch) or each where it is used. cuda_cores
    (an int8 cache with one query head per kv head) runs `_decode_mha_int8_kernel`
    instead; dequant and prefetch then do not apply."""
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2
    dequant: int = 0
    prefetch: bool = False
    cuda_cores: bool = False  # int8 MHA only: `_decode_mha_int8_kernel`
    # a register cap for ptxas (Triton's `maxnreg`); None leaves the choice to ptxas,
    # which for some large tiles settles on 32 registers and spills the rest
    maxnreg: int | None = None


# on CUDA: the default, and the cache dtypes that measured faster with another
# (scripts/tune_kernels.py times the alternatives). int8 on one H200, with head-major
# scales, GQA (8 kv heads): 135 us at B=64, ctx=2048 (bf16: 129 us). Without a register
# cap ptxas gives these 128-key tiles 255 registers, or settles on 32 and spills (the
# Triton 3.6 toolchain): 174 us there. With calibrated parameters (STATIC_INT8_LAUNCH)
# issuing a tile's loads together pays, and the same cap: 107 us there, 452 against 500
# us (bf16: 522) at B=256 with 32 kv heads and contexts of 64-1024, 207 against 227 us
# (bf16: 259) at B=128, ctx=512 (MHA now takes STATIC_MHA_INT8_LAUNCH). Caps of 80-112
# and 144 were slower.
DEFAULT_LAUNCH = DecodeLaunch()
LAUNCH: dict[torch.dtype, DecodeLaunch] = {
    torch.int8: DecodeLaunch(block_n=128, num_warps=4, num_stages=1, dequant=2, maxnreg=128)}
STATIC_INT8_LAUNCH = DecodeLaunch(block_n=128, num_warps=4, num_stages=1, dequant=2,
                                  prefetch=True, maxnreg=128)


# int8 MHA: `_decode_mha_int8_kernel` (CUDA cores, one warp a program), with per-token
# scales and with calibrated parameters. One H200, 32 heads, µs, bf16 in the same run:
#
#   shape                     bf16   per-token (32/1)   calibrated (16/1)   tensor cores*
#   B=128, ctx=512            260    149                159                 207
#   B=256, ctx 150-450        301    193                199                 289
#
# (*: STATIC_INT8_LAUNCH, the calibrated default before.) On one H100 the kernel it
# replaced (float conversions with a float add a code, [tokens, dims] partial sums: 255
# registers) took 233 and 313 us with per-token scales, this one 210 and 268. Wider
# tiles or more warps a program were slower (scripts/tune_kernels.py).
MHA_INT8_LAUNCH = DecodeLaunch(block_n=32, num_warps=1, num_stages=1, cuda_cores=True)
STATIC_MHA_INT8_LAUNCH = DecodeLaunch(block_n=16, num_warps=1, num_stages=1, cuda_cores=True)


_CPU_LAUNCH = DecodeLaunch(block_n=16)


def arrival_counters(max_tokens: int, num_kv: int, device: torch.device) -> torch.Tensor:
    """The zeroed counters `decode_attention` merges its splits with in one kernel,
    for up to max_tokens decode tokens of num_kv kv heads. The kernels leave them
    zeroed; launches that share them must run one after another (one stream), as
    the layers of a model do. Allocate them outside CUDA graph capture."""
    return torch.zeros(max(1, max_tokens * num_kv), dtype=torch.int32, device=device)


# float32 parts a thread loads in one step of a merge (its registers for them)
MERGE_LOAD = 32
# the fewest splits the split kernel merges itself (given counters); with fewer, each
# program has more keys to read, and the merge's tail cost more than a kernel boundary
MERGE_MIN_SPLITS = 8


def _merge_chunk(group: int, d_pad: int, num_warps: int, splits: int) -> int:
    """Splits a merge step loads: about MERGE_LOAD values a thread."""
    fit = max(1, MERGE_LOAD * 32 * num_warps // (next_pow2(group) * d_pad))
    return min(1 << (fit.bit_length() - 1), next_pow2(splits))


def decode_attention(q, k_cache, v_cache, block_tables, seq_lens, max_seq_len, scale,
                     sliding_window, k_scales, v_scales,
                     static_params: tuple[float, float, float, float] | None = None,
                     launch: DecodeLaunch | None = None,
                     arrivals: torch.Tensor | None = None) -> torch.Tensor:
    """``static_params`` (k_scale, k_zp, v_scale, v_zp): an int8 cache written with
    these calibrated parameters for every token, so the per-token scales are not read.
    ``arrivals``: `arrival_counters` for at least this many tokens, so that the split
    kernel merges its splits itself (module docstring); else a reduce kernel does."""
    num_tokens, num_q, head_dim = q.shape
    page, num_kv = k_cache.shape[1], k_cache.shape[2]
    group = num_q // num_kv
    quant = k_cache.dtype == torch.int8
    if launch is None and quant and group == 1:  # on CPU too: the tests see this choice
        launch = MHA_INT8_LAUNCH if static_params is None else STATIC_MHA_INT8_LAUNCH
    elif launch is None and not q.is_cuda:
        launch = _CPU_LAUNCH
    elif launch is None:
        launch = (STATIC_INT8_LAUNCH if quant and static_params is not None
                  else LAUNCH.get(k_cache.dtype, DEFAULT_LAUNCH))
    block_n = launch.block_n
    splits = _num_splits(q, num_kv, max_seq_len, sliding_window, block_n)
    out = torch.empty_like(q)
    if splits == 1:
        merge = 2  # the one split writes the output
    elif (arrivals is not None and arrivals.numel() >= num_tokens * num_kv
          and splits >= MERGE_MIN_SPLITS):
        merge = 1  # the last split to finish merges
    else:
        merge = 0  # the reduce kernel merges
    if merge == 2:  # no parts (the pointers are placeholders)
        part_out = part_lse = out
        part_strides = (0,) * 5
    else:
        part_out = torch.empty(num_tokens, num_q, splits, head_dim, dtype=torch.float32,
                               device=q.device)
        part_lse = torch.empty(num_tokens, num_q, splits, dtype=torch.float32,
                               device=q.device)
        part_strides = (*part_out.stride()[:3], *part_lse.stride()[:2])
    ks = k_scales if quant else k_cache
    vs = v_scales if quant else v_cache
    d_pad = max(16, next_pow2(head_dim))
    chunk = _merge_chunk(group, d_pad, launch.num_warps, splits)
    args = (q, k_cache, v_cache, ks, vs, block_tables, seq_lens, part_out, part_lse, out,
            arrivals if merge == 1 else seq_lens,  # (a placeholder pointer when unused)
            scale * math.log2(math.e), sliding_window or 0, q.stride(0), q.stride(1),
            block_tables.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            ks.stride(0), ks.stride(1), ks.stride(2), *part_strides,
            out.stride(0), out.stride(1), head_dim,
            *[float(x) for x in (static_params or (1.0, 0.0, 1.0, 0.0))])
    grid = (num_tokens, num_kv, splits)
    static = quant and static_params is not None
    if quant and group == 1 and launch.cuda_cores:
        # the tile rows its layout spreads over threads: 16-byte vectors across a row
        rows = min(block_n, max(1, 512 // d_pad) * launch.num_warps)
        _decode_mha_int8_kernel[grid](
            *args, MERGE=merge, CHUNK=chunk, D_PAD=d_pad, BLOCK_N=block_n, PAGE=page,
            HAS_WINDOW=sliding_window is not None, STATIC=static, ROWS=rows, ASM=q.is_cuda,
            num_warps=launch.num_warps, num_stages=launch.num_stages, maxnreg=launch.maxnreg,
            **launch_kwargs(q))
    else:
        _decode_split_kernel[grid](
            *args, MERGE=merge, CHUNK=chunk, GROUP=group, GROUP_PAD=max(16, next_pow2(group)),
            GROUP_P2=next_pow2(group), D_PAD=d_pad, BLOCK_N=block_n, PAGE=page, QUANT=quant,
            HAS_WINDOW=sliding_window is not None, DEQUANT=launch.dequant if quant else 0,
            STATIC=static, PREFETCH=launch.prefetch, num_warps=launch.num_warps,
            num_stages=launch.num_stages, maxnreg=launch.maxnreg, **launch_kwargs(q))
    if merge == 0:
        _decode_reduce_kernel[(num_tokens, num_q)](
            part_out, part_lse, out, splits, part_out.stride(0), part_out.stride(1),
            part_out.stride(2), part_lse.stride(0), part_lse.stride(1), out.stride(0),
            out.stride(1), head_dim, CHUNK=next_pow2(splits), D_PAD=d_pad, num_warps=4,
            **launch_kwargs(q))
    return out
