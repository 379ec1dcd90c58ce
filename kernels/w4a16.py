"""W4A16 matmul over AutoAWQ "GEMM"-packed weights, dequantized inside the kernel.

Layout (as AutoAWQ writes it, and public AWQ checkpoints ship it):
``qweight`` int32 [K, N/8], ``qzeros`` int32 [K/G, N/8], ``scales`` [K/G, N];
nibble i of packed column c is output column ``c*8 + (0,2,4,6,1,3,5,7)[i]``
and ``w = (q - z) * s``. No repacking is needed.

A tensor-core GEMM that multiplies each nibble's columns separately (up to 16
rows), taking the codes themselves as 16-bit floats ``OFFSET + q`` and applying
zero point and scale to the product, or that spreads each packed word over its 8
columns, dequantizes them and runs one wide dot (more rows). When K is
split, float32 partial sums are added up in a fixed order by a small kernel
(deterministic results).
(Batches of up to 4 rows in bf16 go to PyTorch's int4 matmul instead, see
int4_tinygemm.py: none of the Triton GEMVs tried here beat about 1 TB/s of
4-bit weights, docs/benchmarks.md. Prompt chunks of more than FUSED_MAX_ROWS rows
dequantize the weight in a separate kernel and run the dense GEMM.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from . import reference
from ._dispatch import HAS_TRITON, cdiv, num_sms, use_triton

__all__ = ["w4a16_gemm", "awq_dequantize"]

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _spread8(words):
        """Each packed word repeated over its 8 columns along the last axis (three
        interleaves): word c at columns 8c .. 8c+7."""
        words = tl.interleave(words, words)
        words = tl.interleave(words, words)
        return tl.interleave(words, words)

    @triton.jit
    def _codes_minus_zeros(words, zero_words, shift):
        """q - z as float32, the nibbles at `shift` of the packed words and of their zero
        points' words:
        ``0x4B000000 | q`` is the float 2^23 + q, so the difference is exact without an
        int->float conversion."""
        q = ((words >> shift) & 0xF) | 0x4B000000
        z = ((zero_words >> shift) & 0xF) | 0x4B000000
        return q.to(tl.float32, bitcast=True) - z.to(tl.float32, bitcast=True)

    @triton.jit
    def _store_unpacked(out, a0, a1, a2, a3, a4, a5, a6, a7, mask):
        """Writes the eight nibble accumulators of packed column c to output columns
        c*8 + AutoAWQ's order [0, 2, 4, 6, 1, 3, 5, 7]."""
        dt = out.dtype.element_ty
        tl.store(out + 0, a0.to(dt), mask=mask)
        tl.store(out + 2, a1.to(dt), mask=mask)
        tl.store(out + 4, a2.to(dt), mask=mask)
        tl.store(out + 6, a3.to(dt), mask=mask)
        tl.store(out + 1, a4.to(dt), mask=mask)
        tl.store(out + 3, a5.to(dt), mask=mask)
        tl.store(out + 5, a6.to(dt), mask=mask)
        tl.store(out + 7, a7.to(dt), mask=mask)

    @triton.jit
    def _nibble_mma(acc, x, xsum, packed, zeros, s_row_ptr, cp, cmask, NIBBLE: tl.constexpr,
                    MAGIC: tl.constexpr, OFFSET: tl.constexpr):
        """acc += x @ W_nibble, W_nibble = (q - z) * s for the columns of one nibble.
        Working per nibble keeps the packed words in place (no interleaving into a
        [K, N] tile).

        MAGIC > 0 multiplies the codes themselves: OR-ing q into the mantissa of
        OFFSET (MAGIC: its 16-bit pattern, 128 in bf16 or 1024 in fp16) makes the
        16-bit value OFFSET + q exactly, and the zero point, the offset and the scale
        are applied to the [BLOCK_M, BLOCK_NP] product instead of to every weight:
        ``x . ((q - z) s) = s (x . (OFFSET + q) - (OFFSET + z) sum(x))`` within a group
        (xsum: x's rows summed over this K step). MAGIC == 0 dequantizes every weight
        (`_codes_minus_zeros`).
        """
        col = cp * 8 + ((NIBBLE % 4) * 2 + NIBBLE // 4)
        if MAGIC > 0:
            q = (((packed >> (4 * NIBBLE)) & 0xF) | MAGIC).to(tl.int16).to(x.dtype, bitcast=True)
            t = tl.dot(x, q)
            z = ((zeros >> (4 * NIBBLE)) & 0xF).to(tl.float32) + OFFSET
            s = tl.load(s_row_ptr + col, mask=cmask, other=0.0).to(tl.float32)
            return acc + (t - xsum[:, None] * z[None, :]) * s[None, :]
        s = tl.load(s_row_ptr + col, mask=cmask, other=0.0).to(tl.float32)
        w = _codes_minus_zeros(packed, zeros[None, :], 4 * NIBBLE) * s[None, :]
        return tl.dot(x, w.to(x.dtype), acc)

    @triton.jit
    def _load_k_step(x_ptr, qw_ptr, it, rk, offs_m, mmask, cp, cmask, s_xm, s_qk,
                     BLOCK_K: tl.constexpr, GROUP: tl.constexpr):
        """K step ``it``: the activations [BLOCK_M, BLOCK_K], the packed weight words
        [BLOCK_K, BLOCK_NP] and the index of their quantization group."""
        k = (it * BLOCK_K + rk).to(tl.int64)
        x = tl.load(x_ptr + offs_m[:, None] * s_xm + k[None, :], mask=mmask[:, None],
                    other=0.0)
        p = tl.load(qw_ptr + k[:, None] * s_qk + cp[None, :], mask=cmask[None, :], other=0)
        return x, p, (it * BLOCK_K) // GROUP

    @triton.jit
    def _gemm_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, part_ptr, M, n_packed, iters_per_split,
                     num_iters, s_xm, s_qk, s_sk, s_zk, s_ps, s_pm, GROUP: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_NP: tl.constexpr, BLOCK_K: tl.constexpr,
                     MAGIC: tl.constexpr = 0, OFFSET: tl.constexpr = 0.0):
        """Eight narrow dots a K step, one a nibble (`_nibble_mma`; MAGIC > 0: of the
        codes themselves). BLOCK_K divides the group."""
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cp = tl.program_id(1) * BLOCK_NP + tl.arange(0, BLOCK_NP)
        split = tl.program_id(2)
        mmask = offs_m < M
        cmask = cp < n_packed
        rk = tl.arange(0, BLOCK_K)
        a0 = tl.zeros([BLOCK_M, BLOCK_NP], tl.float32)
        a1, a2, a3, a4, a5, a6, a7 = a0, a0, a0, a0, a0, a0, a0
        it_begin = split * iters_per_split
        it_end = tl.minimum(it_begin + iters_per_split, num_iters)
        for it in range(it_begin, it_end):
            x, p, g = _load_k_step(x_ptr, qw_ptr, it, rk, offs_m, mmask, cp, cmask, s_xm,
                                   s_qk, BLOCK_K, GROUP)
            xsum = tl.zeros([BLOCK_M], tl.float32)
            if MAGIC > 0:
                # the rows' sums by the tensor cores too (every column of the product is
                # the same sum, so the max picks it exactly), not by shuffles
                xsum = tl.max(tl.dot(x, tl.full([BLOCK_K, 16], 1.0, x.dtype)), axis=1)
            zq = tl.load(z_ptr + g * s_zk + cp, mask=cmask, other=0)
            srow = s_ptr + g * s_sk
            a0 = _nibble_mma(a0, x, xsum, p, zq, srow, cp, cmask, 0, MAGIC, OFFSET)
            a1 = _nibble_mma(a1, x, xsum, p, zq, srow, cp, cmask, 1, MAGIC, OFFSET)
            a2 = _nibble_mma(a2, x, xsum, p, zq, srow, cp, cmask, 2, MAGIC, OFFSET)
            a3 = _nibble_mma(a3, x, xsum, p, zq, srow, cp, cmask, 3, MAGIC, OFFSET)
            a4 = _nibble_mma(a4, x, xsum, p, zq, srow, cp, cmask, 4, MAGIC, OFFSET)
            a5 = _nibble_mma(a5, x, xsum, p, zq, srow, cp, cmask, 5, MAGIC, OFFSET)
            a6 = _nibble_mma(a6, x, xsum, p, zq, srow, cp, cmask, 6, MAGIC, OFFSET)
            a7 = _nibble_mma(a7, x, xsum, p, zq, srow, cp, cmask, 7, MAGIC, OFFSET)
        out = part_ptr + split * s_ps + offs_m[:, None] * s_pm + cp[None, :] * 8
        mask = mmask[:, None] & cmask[None, :]
        _store_unpacked(out, a0, a1, a2, a3, a4, a5, a6, a7, mask)

    @triton.jit
    def _gemm_joined_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, part_ptr, M, N, iters_per_split,
                            num_iters, s_xm, s_qk, s_sk, s_zk, s_ps, s_pm, GROUP: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_NP: tl.constexpr, BLOCK_K: tl.constexpr):
        """The same product with one [BLOCK_K, 8 * BLOCK_NP] weight tile a step: each packed
        word is repeated over its 8 output columns (`_spread8`) and every column shifts
        out its own nibble, so one wide dot replaces eight narrow ones and the output is
        stored in natural column order."""
        BLOCK_N: tl.constexpr = BLOCK_NP * 8
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cp = tl.program_id(1) * BLOCK_NP + tl.arange(0, BLOCK_NP)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        split = tl.program_id(2)
        mmask = offs_m < M
        pmask = cp < N // 8
        nmask = offs_n < N
        j = offs_n % 8  # AutoAWQ keeps column j of a word in nibble j // 2 + 4 * (j % 2)
        shift = 4 * (j // 2 + 4 * (j % 2))
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        it_begin = split * iters_per_split
        it_end = tl.minimum(it_begin + iters_per_split, num_iters)
        for it in range(it_begin, it_end):
            x, p, g = _load_k_step(x_ptr, qw_ptr, it, rk, offs_m, mmask, cp, pmask, s_xm,
                                   s_qk, BLOCK_K, GROUP)
            zq = tl.load(z_ptr + g * s_zk + cp, mask=pmask, other=0)
            s = tl.load(s_ptr + g * s_sk + offs_n, mask=nmask, other=0.0).to(tl.float32)
            w = _codes_minus_zeros(_spread8(p), _spread8(zq)[None, :], shift[None, :]) \
                * s[None, :]
            acc = tl.dot(x, w.to(x.dtype), acc)
        out = part_ptr + split * s_ps + offs_m[:, None] * s_pm + offs_n[None, :]
        tl.store(out, acc.to(part_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])

    @triton.jit
    def _dequant_kernel(qw_ptr, s_ptr, z_ptr, out_ptr, K, N, s_qk, s_sk, s_zk, s_ok,
                        GROUP: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_NP: tl.constexpr):
        """out[K, N] = (q - z) * s for a [BLOCK_K, 8 * BLOCK_NP] tile, in float32 and
        rounded once, each packed word spread over its 8 columns as in
        `_gemm_joined_kernel`."""
        BLOCK_N: tl.constexpr = BLOCK_NP * 8
        k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
        cp = tl.program_id(1) * BLOCK_NP + tl.arange(0, BLOCK_NP)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        kmask = k < K
        pmask = kmask[:, None] & (cp < N // 8)[None, :]
        nmask = kmask[:, None] & (offs_n < N)[None, :]
        k64 = k.to(tl.int64)
        g = k64 // GROUP
        p = tl.load(qw_ptr + k64[:, None] * s_qk + cp[None, :], mask=pmask, other=0)
        zq = tl.load(z_ptr + g[:, None] * s_zk + cp[None, :], mask=pmask, other=0)
        s = tl.load(s_ptr + g[:, None] * s_sk + offs_n[None, :], mask=nmask, other=0.0)
        j = offs_n % 8  # AutoAWQ keeps column j of a word in nibble j // 2 + 4 * (j % 2)
        shift = 4 * (j // 2 + 4 * (j % 2))
        w = _codes_minus_zeros(_spread8(p), _spread8(zq), shift[None, :]) * s.to(tl.float32)
        tl.store(out_ptr + k64[:, None] * s_ok + offs_n[None, :],
                 w.to(out_ptr.dtype.element_ty), mask=nmask)

    @triton.jit
    def _sum_splits_kernel(part_ptr, out_ptr, splits, numel, s_ps, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        acc = tl.zeros([BLOCK], tl.float32)
        for i in range(0, splits):
            acc += tl.load(part_ptr + i * s_ps + offs, mask=mask, other=0.0)
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _check(x, qweight, scales, qzeros, group_size):
    k, n = x.shape[-1], scales.shape[-1]
    if group_size <= 0 or k % group_size:
        raise ValueError(f"w4a16_gemm: in_features {k} is not a multiple of group_size "
                         f"{group_size}")
    expect = {"qweight": (k, n // 8), "scales": (k // group_size, n),
              "qzeros": (k // group_size, n // 8)}
    for name, t in (("qweight", qweight), ("scales", scales), ("qzeros", qzeros)):
        if tuple(t.shape) != expect[name]:
            raise ValueError(f"w4a16_gemm: {name} has shape {tuple(t.shape)}, expected "
                             f"{expect[name]} for AutoAWQ GEMM packing (K={k}, N={n}, "
                             f"group_size={group_size})")
    if n % 8 or qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise ValueError("w4a16_gemm: qweight/qzeros must be int32 with 8 nibbles per word")


def _splits(iters: int, tiles: int, sms: int, even: bool = False) -> tuple[int, int]:
    """(num_splits, K steps per split) for `tiles` output tiles of `iters` K steps.

    K is split while the tiles number fewer than 1.5 programs an SM, into as many
    parts as bring the programs to about 2.5 an SM, each of at least 4 K steps, and
    into 16 at most (more partial sums cost more than they gain). One H100, weights
    read from memory, the Llama-3-8B layers whole and halved at 1, 8, 32 and 64 rows:
    against the earlier rule (split only below 0.5 tiles an SM, to 2 programs an SM)
    this took 4096 x 6144 at 64 rows from 36 to 25 µs, 14336 x 4096 at 64 rows from
    55 to 49 and 4096 x 28672 at 8 rows from 61 to 46; docs/benchmarks.md has the rest.

    even (the joined tile, 32 and 64 rows): only split counts that divide iters, the one
    nearest 2.5 programs an SM. There the uneven splits of the rule above (6 of 32 steps
    for 4096 x 4096: five of 6 steps and one of 2) were up to 17% slower than 4 or 8
    equal ones (22.8 against 19.5 µs at 32 rows; `tune_kernels.py --only w4a16-splits`,
    one H100).
    """
    if 2 * tiles >= 3 * sms:
        return 1, iters
    if even:
        # the divisor of iters nearest (by ratio) to 2.5 programs an SM, in the same bounds
        want = 2.5 * sms / tiles
        ways = [d for d in range(1, 17) if iters % d == 0 and (d == 1 or iters // d >= 4)]
        best = min(ways, key=lambda d: abs(math.log(d / want)))
        return best, iters // best
    return _split_into(iters, min(cdiv(5 * sms, 2 * tiles), iters // 4, 16))


def _split_into(iters: int, want: int) -> tuple[int, int]:
    """(num_splits, K steps per split) for about `want` equal splits of `iters` K steps."""
    per = cdiv(iters, max(1, min(want, iters)))
    return cdiv(iters, per), per


KINDS = ("nibbles", "joined", "codes")
# the 16-bit pattern of OFFSET = 2^7 (bf16) or 2^10 (fp16): OR-ing a code q < 16 into
# its mantissa makes the value OFFSET + q exactly
_CODE_MAGIC = {torch.bfloat16: 0x4300, torch.float16: 0x6400}
_CODE_OFFSET = {torch.bfloat16: 128.0, torch.float16: 1024.0}


@dataclass(frozen=True)
class GemmLaunch:
    """The tensor-core kernel's tile (rows, packed columns of 8, K) and launch."""
    block_m: int
    block_np: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    # "nibbles": eight narrow dots a step (_gemm_kernel); "codes": the same of the codes
    # themselves, scaled after the dot (_gemm_kernel with MAGIC); "joined": one
    # [block_k, 8 * block_np] tile of dequantized weights (_gemm_joined_kernel)
    kind: str = "nibbles"
    splits: int = 0  # K split over this many programs a tile; 0: `_gemm`'s rule

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"GemmLaunch: kind must be one of {sorted(KINDS)}, not "
                             f"{self.kind!r}")


def gemm_launch(m: int, group_size: int, cuda: bool, k: int = 0, n: int = 0,
                sms: int = 0) -> GemmLaunch:
    """The launch for M rows of a K x N weight on `sms` multiprocessors
    (scripts/tune_kernels.py times the alternatives). Llama-3-8B MLP shapes, weights
    read from memory: up to 16 rows the eight narrow dots of the codes are fastest (one
    H100: 30 us at 8 rows against 35-36 us for the dequantized nibbles and 47-49 us for
    bf16 cuBLAS); at 32 and 64 the joined tile (one H200: 52 us at 64 rows against
    86-90 us).

    The joined tile is 128 columns wide (16 packed words) where, split over K as
    `_splits` does to fill the GPU, each program still runs 8 K steps or more, else 64.
    One H100, 64 rows: 4096 x 28672 99.9 -> 86.4 us, 14336 x 4096 50.9 -> 46.0; where
    the split would leave 4 steps (4096 x 6144) the wide tile was slower, 27.5 against
    25.2 (k, n or sms unknown: 64)."""
    block_k = min(group_size, 128 if cuda else 32)
    if m <= 16:
        return GemmLaunch(16, 32, block_k, num_warps=4, num_stages=2, kind="codes")
    launch = GemmLaunch(32 if m <= 32 else 64, 8, block_k, kind="joined")
    if k and n and sms:
        wide = replace(launch, block_np=16)
        tiles = cdiv(m, wide.block_m) * cdiv(n // 8, wide.block_np)
        if _splits(k // block_k, tiles, sms, even=True)[1] >= 8:
            return wide
    return launch


def _gemm(x, qweight, scales, qzeros, group_size, out, launch: GemmLaunch | None = None):
    (m, k), n_packed = x.shape, qweight.shape[1]
    sms = num_sms(x)
    launch = launch or gemm_launch(m, group_size, x.is_cuda, k, n_packed * 8, sms)
    if launch.kind == "codes" and x.dtype not in _CODE_MAGIC:
        launch = replace(launch, kind="nibbles")  # the codes are 16-bit floats
    block_m, block_np, block_k = launch.block_m, launch.block_np, launch.block_k
    tiles = cdiv(m, block_m) * cdiv(n_packed, block_np)
    iters = k // block_k
    if launch.splits:
        splits, per = _split_into(iters, launch.splits)
    else:
        splits, per = _splits(iters, tiles, sms, even=launch.kind == "joined")
    part = _partials(splits, out)
    extra = {}
    if launch.kind == "joined":
        kernel, width = _gemm_joined_kernel, n_packed * 8
    elif launch.kind == "codes":
        kernel, width = _gemm_kernel, n_packed
        extra = dict(MAGIC=_CODE_MAGIC[x.dtype], OFFSET=_CODE_OFFSET[x.dtype])
    else:
        kernel, width = _gemm_kernel, n_packed
    kernel[(cdiv(m, block_m), cdiv(n_packed, block_np), splits)](
        x, qweight, scales, qzeros, part, m, width, per, iters, x.stride(0),
        qweight.stride(0), scales.stride(0), qzeros.stride(0), part.stride(0),
        part.stride(1), GROUP=group_size, BLOCK_M=block_m, BLOCK_NP=block_np,
        BLOCK_K=block_k, num_warps=launch.num_warps, num_stages=launch.num_stages, **extra)
    return part


def _partials(splits: int, out: torch.Tensor) -> torch.Tensor:
    """[splits, M, N] float32 partial sums, or ``out`` itself when K is not split."""
    if splits == 1:
        return out.unsqueeze(0)
    return torch.empty(splits, *out.shape, dtype=torch.float32, device=out.device)


# Up to this many rows `w4a16_gemm` runs the fused kernel; from one more on it
# dequantizes the whole weight (`awq_dequantize`) and multiplies with torch.matmul
# (cuBLAS): prompt chunks are compute-bound, where the library GEMM is far ahead, and
# writing and reading back the 16-bit weight costs little against the multiply. One
# H100, Llama-3-8B layers, weights read from memory (`tune_kernels.py --only
# w4a16-rows`), fused against dequantized: 4096 x 28672 at 128 rows 165 / 206 us, at
# 192 rows 249 / 216, at 2048 rows 2368 / 821 (bf16 cuBLAS 706); 4096 x 6144 at 128
# rows 41 / 47, at 192 71 / 53. Above 64 rows the fused kernel's time steps up every
# 64 rows (its tile), so the switch sits on a step.
FUSED_MAX_ROWS = 128
# `_dequant_kernel`'s rows, packed columns and warps: 2.6 TB/s on one H100 (14336 x 4096),
# 5% ahead of (32, 16, 4)
DEQUANT_LAUNCH = (16, 32, 8)


def awq_dequantize(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
                   group_size: int, dtype: torch.dtype | None = None,
                   launch: tuple[int, int, int] | None = None) -> torch.Tensor:
    """[K, N] weights ``w = (q - z) * s`` from AutoAWQ GEMM packing, in ``dtype`` (default:
    the scales' dtype); computed in float32 and rounded once, as `reference.awq_dequantize`."""
    k, n = qweight.shape[0], scales.shape[1]
    dtype = dtype or scales.dtype
    supported = group_size > 0 and k % group_size == 0 and n % 8 == 0
    if not use_triton(qweight) or not supported:
        return reference.awq_dequantize(qweight, scales.float(), qzeros, group_size).to(dtype)
    qweight, scales, qzeros = qweight.contiguous(), scales.contiguous(), qzeros.contiguous()
    out = torch.empty(k, n, dtype=dtype, device=qweight.device)
    block_k, block_np, num_warps = launch or DEQUANT_LAUNCH
    _dequant_kernel[(cdiv(k, block_k), cdiv(n // 8, block_np))](
        qweight, scales, qzeros, out, k, n, qweight.stride(0), scales.stride(0),
        qzeros.stride(0), out.stride(0), GROUP=group_size, BLOCK_K=block_k,
        BLOCK_NP=block_np, num_warps=num_warps)
    return out


def w4a16_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
               qzeros: torch.Tensor, group_size: int,
               launch: GemmLaunch | None = None) -> torch.Tensor:
    """``x [.., K] @ W [K, N]`` with W given in AutoAWQ GEMM packing; output in x.dtype.
    launch: the tensor-core kernel's launch (default: `gemm_launch` up to FUSED_MAX_ROWS
    rows, beyond that the weight dequantized and multiplied by torch.matmul)."""
    _check(x, qweight, scales, qzeros, group_size)
    supported = group_size >= 16 and group_size & (group_size - 1) == 0
    if not use_triton(x) or not supported:
        return reference.w4a16_gemm(x, qweight, scales, qzeros, group_size)
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    qweight, scales, qzeros = qweight.contiguous(), scales.contiguous(), qzeros.contiguous()
    m, n = x2.shape[0], scales.shape[1]
    if launch is None and m > FUSED_MAX_ROWS:
        w = awq_dequantize(qweight, scales, qzeros, group_size, x.dtype)
        return torch.matmul(x2, w).view(*x.shape[:-1], n)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out.view(*x.shape[:-1], n)

    part = _gemm(x2, qweight, scales, qzeros, group_size, out, launch)
    if part.data_ptr() != out.data_ptr():
        block = 1024
        _sum_splits_kernel[(cdiv(m * n, block),)](part, out, part.shape[0], m * n,
                                                  part.stride(0), BLOCK=block, num_warps=4)
    return out.view(*x.shape[:-1], n)
