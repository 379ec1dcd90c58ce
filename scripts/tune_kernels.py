#!/usr/bin/env python3
"""Times launch configurations of the kernels whose defaults are a guess, on one GPU.

    python3 scripts/tune_kernels.py [--quick]
        [--only decode|w4a16|w4a16-splits|w4a16-rows|gemv|gemv-rotary]

- int8-KV decode attention (kernels/attention_decode.py, `LAUNCH`): keys per
  tile, warps, stages and the way it dequantizes, at the Llama-3-8B head layout
  (32 q heads, 8 kv heads) and the Llama-2-7B one (32 and 32; there also the
  CUDA-core kernel of `MHA_INT8_LAUNCH` and `STATIC_MHA_INT8_LAUNCH`, the defaults
  for MHA), head dim 128,
  64-token pages, with the scales laid out as the engine does (head-major within
  a block); the bf16 cache and token-major scales are timed beside it at the
  default launch;
- the W4A16 tensor-core GEMM (kernels/w4a16.py, `gemm_launch`) at 8, 16 and 64
  rows on the Llama-3-8B MLP shapes, and its K split (`--only w4a16-splits`) on
  every Llama-3-8B layer, whole and halved, with the weights read from memory;
  and the row count from which dequantizing the weight for cuBLAS wins
  (`--only w4a16-rows`, `FUSED_MAX_ROWS`, `DEQUANT_LAUNCH`);
- the one-row GEMV and its SwiGLU twin (kernels/gemv.py, `LAUNCH`, `SILU_LAUNCH`)
  on the Llama-3-8B matrices whole and halved for tp=2, with the weights read from
  memory, not L2 (`--only gemv`). Every launch keeps the default `preload`: what
  preloading buys is overlap with the kernel before, which a GEMV timed alone
  cannot show (time it in a whole step: `scripts/gpu_check.sh ab`);
- the q/k/v GEMV with rotary and the cache write (kernels/gemv_rotary.py, `launch_for`)
  at the Llama-3-8B heads whole (32 q, 8 kv) and halved for tp=2, the same way
  (`--only gemv-rotary`).

Every configuration's output is checked against the default's; the table shows
the default, the best and the gain. Copy the winners into the kernels' tables.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).parent))
import bench_kernels  # noqa: E402
from bench_kernels import paged_cache  # noqa: E402

from tpserve.kernels import attention_decode, w4a16  # noqa: E402
from tpserve.kernels.testing import random_awq  # noqa: E402

NQ, NKV, D = 32, 8, 128
BF16 = dict(dtype=torch.bfloat16, device="cuda")
SMS = torch.cuda.get_device_properties(0).multi_processor_count if torch.cuda.is_available() else 0


def bench(fn) -> float:
    """Median microseconds, replayed from a CUDA graph (no launch overhead)."""
    return bench_kernels.bench(fn) * 1e3


def sweep(name: str, configs, run, default) -> tuple[str, float, object, float]:
    want = run(default)
    base = bench(lambda: run(default))
    best, best_us = default, base
    for cfg in configs:
        try:
            got = run(cfg)
            torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
            us = bench(lambda: run(cfg))
            print(f"  {name} {cfg}: {us:.1f} us", flush=True)
        except Exception as exc:  # noqa: BLE001 - a config that fails to compile or disagrees
            print(f"  {name} {cfg}: skipped ({str(exc).splitlines()[0][:80]})", flush=True)
            continue
        if us < best_us:
            best, best_us = cfg, us
    print(f"{name}: default {base:.1f} us, best {best_us:.1f} us ({base / best_us:.2f}x) {best}",
          flush=True)
    return name, base, best, best_us


def tune_decode(quick: bool) -> list:
    rows = []
    for batch, ctx, nkv in ((16, 4096, NKV), (64, 2048, NKV), (128, 512, NQ)):
        q = torch.randn(batch, NQ, D, **BF16)
        seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
        kc, vc, _, _, tables = paged_cache(batch, ctx, False, nkv)
        bf16_us = bench(lambda: attention_decode.decode_attention(
            q, kc, vc, tables, seq_lens, ctx, D ** -0.5, None, None, None))
        print(f"bf16 decode B={batch} ctx={ctx} kv heads={nkv}: {bf16_us:.1f} us", flush=True)
        mha = nkv == NQ  # int8 MHA with per-token scales defaults to the CUDA-core kernel
        default = (attention_decode.MHA_INT8_LAUNCH if mha else
                   attention_decode.LAUNCH.get(torch.int8, attention_decode.DEFAULT_LAUNCH))
        kc, vc, ks, vs, tables = paged_cache(batch, ctx, True, nkv, head_major_scales=False)
        us = bench(lambda: attention_decode.decode_attention(
            q, kc, vc, tables, seq_lens, ctx, D ** -0.5, None, ks, vs, launch=default))
        print(f"int8 decode B={batch} ctx={ctx} kv heads={nkv}, token-major scales, "
              f"{default}: {us:.1f} us", flush=True)
        kc, vc, ks, vs, tables = paged_cache(batch, ctx, True, nkv)

        def run(launch):
            return attention_decode.decode_attention(q, kc, vc, tables, seq_lens, ctx, D ** -0.5,
                                                     None, ks, vs, launch=launch)

        grid = itertools.product((64, 128) if quick else (32, 64, 128),
                                 (4,) if quick else (2, 4, 8),
                                 (1, 2) if quick else (1, 2, 3, 4),
                                 (1, 2) if quick else (0, 1, 2), (False, True), (None, 128))
        # prefetching applies to the codes read as such (dequant 2); the last field caps
        # the registers (`DecodeLaunch.maxnreg`)
        configs = [attention_decode.DecodeLaunch(*c[:5], maxnreg=c[5]) for c in grid
                   if c[3] == 2 or not c[4]]
        if mha:
            configs += [attention_decode.DecodeLaunch(n, w, st, cuda_cores=True)
                        for n, w, st in itertools.product((16, 32, 64, 128), (1, 2, 4), (1, 2))]
        rows.append(sweep(f"int8 decode B={batch} ctx={ctx} kv heads={nkv}", configs, run,
                          default))
        # calibrated parameters: no per-token scales read
        launches = [dataclasses.replace(attention_decode.STATIC_INT8_LAUNCH, prefetch=prefetch,
                                        num_stages=stages, maxnreg=maxnreg)
                    for prefetch, stages, maxnreg in itertools.product((False, True), (1, 2),
                                                                      (None, 128))]
        if mha:  # the CUDA-core kernel, the default there
            launches += [attention_decode.DecodeLaunch(n, w, 1, cuda_cores=True)
                         for n, w in itertools.product((16, 32, 64, 128), (1, 2, 4))]
        for launch in launches:
            us = bench(lambda: attention_decode.decode_attention(
                q, kc, vc, tables, seq_lens, ctx, D ** -0.5, None, ks, vs,
                (0.02, 0.0, 0.02, 0.0), launch=launch))
            print(f"int8 decode B={batch} ctx={ctx} kv heads={nkv}, calibrated (static) "
                  f"parameters, {launch}: {us:.1f} us", flush=True)
    return rows


def tune_w4a16(quick: bool) -> list:
    rows = []
    for k, n in ((4096, 14336), (14336, 4096)):
        qweight, scales, qzeros = random_awq(k, n, 128, **BF16)
        for m in (8, 16, 64):
            x = torch.randn(m, k, **BF16)

            def run(launch):
                return w4a16.w4a16_gemm(x, qweight, scales, qzeros, 128, launch=launch)

            block_ms = (16,) if m <= 16 else (32, 64)
            grid = itertools.product(block_ms, (8, 16, 32, 64), (128,),
                                     (4,) if quick else (4, 8), (2, 3, 4), w4a16.KINDS)
            configs = [w4a16.GemmLaunch(*c) for c in grid]  # last field: the kind of tile
            rows.append(sweep(f"w4a16 M={m} K={k} N={n}", configs, run,
                              w4a16.gemm_launch(m, 128, True, k, n, SMS)))
    return rows


def bench_cold(fn, nbytes: int, copies_of) -> float:
    """Median microseconds a call of fn(copy) when the copies together are far larger
    than L2, so each call reads its weights from memory (a CUDA graph goes round them)."""
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    copies = copies_of(max(2, -(-4 * l2 // nbytes)))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for c in copies:
            fn(c)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in copies:
            fn(c)
    return triton.testing.do_bench(graph.replay, rep=100, return_mode="median") * 1e3 / len(copies)


def sweep_cold(name: str, run, default: dict, launches: list[dict], w: torch.Tensor,
               copies_of) -> tuple[str, float, dict, float]:
    """`sweep` for one-row kernels over a 16-bit weight w, read from memory: run(w_copy,
    **launch) for each launch, checked against the default's output."""
    want = run(w, **default)
    base = bench_cold(lambda c: run(c, **default), w.numel() * 2, copies_of)
    best, best_us = default, base
    for cfg in launches:
        try:
            torch.testing.assert_close(run(w, **cfg).float(), want.float(), atol=2e-2,
                                       rtol=2e-2)
            us = bench_cold(lambda c: run(c, **cfg), w.numel() * 2, copies_of)
        except Exception as exc:  # noqa: BLE001
            print(f"  {name} {cfg}: skipped ({str(exc).splitlines()[0][:80]})")
            continue
        print(f"  {name} {cfg}: {us:.1f} us", flush=True)
        if us < best_us:
            best, best_us = cfg, us
    tbs = w.numel() * 2 / best_us / 1e6
    print(f"{name}: default {base:.1f} us, best {best_us:.1f} us ({tbs:.2f} TB/s) {best}",
          flush=True)
    return name, base, best, best_us


def tune_gemv(quick: bool) -> list:
    from tpserve.kernels import gemv

    rows = []
    shapes = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336),  # tp=1
              (3072, 4096), (4096, 2048), (14336, 4096), (4096, 7168)]   # tp=2
    grid = list(itertools.product((1, 2, 4, 8), (512, 1024, 2048) if not quick else (1024, 2048),
                                  (1, 2, 4, 8) if not quick else (2, 4)))
    for silu in (False, True):
        fn = gemv.gemv_silu_mul if silu else gemv.gemv
        default = gemv.SILU_LAUNCH if silu else gemv.LAUNCH
        for n, k in shapes:
            if silu and n < 14336:
                continue  # only [gate | up] shapes
            x = torch.randn(1, k, **BF16)
            w = torch.randn(n, k, **BF16) / k ** 0.5

            def copies_of(c, w=w):
                return [w.clone() for _ in range(c)]
            name = f"{'gemv_silu_mul' if silu else 'gemv'} {n}x{k}"
            launches = [dict(block_n=bn, block_k=bk, num_warps=nw) for bn, bk, nw in grid]
            rows.append(sweep_cold(name, lambda c, **cfg: fn(x, c, **cfg), default, launches,
                                   w, copies_of))
    return rows


def tune_gemv_rotary(quick: bool) -> list:
    from tpserve.kernels import build_cos_sin_cache, gemv_rotary

    rows = []
    grid = list(itertools.product((1, 2, 4), (512, 1024, 2048) if not quick else (1024,),
                                  (1, 2, 4, 8) if not quick else (2, 4)))
    cos_sin = build_cos_sin_cache(torch.rand(D // 2, device="cuda"), 8192)
    pos = torch.tensor([4000], device="cuda")
    slot = torch.tensor([70], device="cuda")
    for nq, nkv in ((NQ, NKV), (NQ // 2, NKV // 2)):  # tp=1, tp=2
        k = 4096
        x = torch.randn(1, k, **BF16)
        w = torch.randn((nq + 2 * nkv) * D, k, **BF16) / k ** 0.5
        kc, vc = (torch.zeros(4, 64, nkv, D, **BF16) for _ in range(2))

        def run(c, **cfg):
            return gemv_rotary.qkv_rotate_and_store(x, c, None, nq, nkv, pos, cos_sin, kc, vc,
                                                    slot, **cfg)

        def copies_of(c, w=w):
            return [w.clone() for _ in range(c)]
        launches = [dict(pairs=p, block_k=bk, num_warps=nw) for p, bk, nw in grid]
        default = dict(gemv_rotary.launch_for(w.shape[0]))
        rows.append(sweep_cold(f"gemv_rotary {nq}/{nkv} heads", run, default, launches, w,
                               copies_of))
    return rows


def tune_w4a16_splits(quick: bool) -> list:
    """The W4A16 GEMM's K split (`GemmLaunch.splits`, 0: `w4a16._splits`' rule) over the
    Llama-3-8B layers whole and halved for tp=2, at 8, 32 and 64 rows (and one with
    --quick), weights read from memory, beside bf16 cuBLAS."""
    rows = []
    layers = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096),  # tp=1
              (4096, 3072), (2048, 4096), (4096, 14336), (7168, 4096)]   # tp=2
    for k, n in layers:
        qweight, scales, qzeros = random_awq(k, n, 128, **BF16)
        nbytes = qweight.nbytes + scales.nbytes + qzeros.nbytes
        dense = torch.randn(n, k, **BF16)

        def copies_of(c):
            return [(qweight.clone(), scales.clone(), qzeros.clone()) for _ in range(c)]
        for m in (1,) if quick else (8, 32, 64):
            x = torch.randn(m, k, **BF16)
            cublas = bench_cold(lambda w: torch.nn.functional.linear(x, w), dense.nbytes,
                                lambda c: [dense.clone() for _ in range(c)])
            want = w4a16.w4a16_gemm(x, qweight, scales, qzeros, 128).float()
            default = w4a16.gemm_launch(m, 128, True, k, n, SMS)
            times = {}
            for splits in (0, 1, 2, 3, 4, 6, 8, 16):
                launch = dataclasses.replace(default, splits=splits)
                got = w4a16.w4a16_gemm(x, qweight, scales, qzeros, 128, launch=launch).float()
                torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
                times[splits] = bench_cold(
                    lambda c: w4a16.w4a16_gemm(x, *c, 128, launch=launch), nbytes, copies_of)
            name = f"w4a16 splits M={m} K={k} N={n}"
            best = min(times, key=times.get)
            print(f"{name}: cuBLAS {cublas:.1f} us, " + ", ".join(
                f"{s or 'rule'} {us:.1f}" for s, us in times.items()), flush=True)
            rows.append((name, times[0], dataclasses.replace(default, splits=best), times[best]))
    return rows


def sweep_dequantize(k, n, qweight, scales, qzeros, nbytes, copies_of):
    """`w4a16.DEQUANT_LAUNCH` (rows, packed columns, warps), weights read from memory."""
    want = w4a16.awq_dequantize(qweight, scales, qzeros, 128)
    times = {}
    for launch in itertools.product((16, 32, 64), (8, 16, 32), (4, 8)):
        if not torch.equal(w4a16.awq_dequantize(qweight, scales, qzeros, 128, launch=launch),
                           want):
            raise AssertionError(f"awq_dequantize at {launch} disagrees with the default")
        times[launch] = bench_cold(lambda c: w4a16.awq_dequantize(*c, 128, launch=launch),
                                   nbytes, copies_of)
    default = w4a16.DEQUANT_LAUNCH
    best = min(times, key=times.get)
    tbs = (nbytes + want.nbytes) / times[best] / 1e6
    print(f"dequantize K={k} N={n}: " + ", ".join(f"{c} {us:.1f}" for c, us in times.items())
          + f"; best {best} {times[best]:.1f} us ({tbs:.2f} TB/s)", flush=True)
    return f"dequantize K={k} N={n}", times[default], best, times[best]


def tune_w4a16_rows(quick: bool) -> list:
    """Where the W4A16 GEMM should hand over to dequantizing the weight and running the
    dense GEMM (`w4a16.FUSED_MAX_ROWS`): both ways, and bf16 cuBLAS on the dense weight,
    over the Llama-3-8B layers at 16 to 2048 rows, weights read from memory."""
    rows = []
    layers = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]
    for k, n in layers[2:] if quick else layers:
        qweight, scales, qzeros = random_awq(k, n, 128, **BF16)
        nbytes = qweight.nbytes + scales.nbytes + qzeros.nbytes
        dense = torch.randn(k, n, **BF16)

        def copies_of(c):
            return [(qweight.clone(), scales.clone(), qzeros.clone()) for _ in range(c)]

        def dequantized(x, qw, s, z):
            return x @ w4a16.awq_dequantize(qw, s, z, 128, x.dtype)

        rows.append(sweep_dequantize(k, n, qweight, scales, qzeros, nbytes, copies_of))
        for m in (64, 256) if quick else (16, 32, 64, 96, 128, 192, 256, 512, 1024, 2048):
            x = torch.randn(m, k, **BF16)
            fused = w4a16.gemm_launch(m, 128, True, k, n, SMS)
            want = dequantized(x, qweight, scales, qzeros).float()
            torch.testing.assert_close(w4a16.w4a16_gemm(x, qweight, scales, qzeros, 128,
                                                        launch=fused).float(), want,
                                       atol=1e-2 * want.abs().max().item(), rtol=2e-2)
            us_fused = bench_cold(lambda c: w4a16.w4a16_gemm(x, *c, 128, launch=fused),
                                  nbytes, copies_of)
            us_deq = bench_cold(lambda c: dequantized(x, *c), nbytes, copies_of)
            us_dense = bench_cold(lambda w: x @ w, dense.nbytes,
                                  lambda c: [dense.clone() for _ in range(c)])
            name = f"w4a16 rows M={m} K={k} N={n}"
            print(f"{name}: fused {us_fused:.1f} us, dequantize + cuBLAS {us_deq:.1f} us, "
                  f"bf16 cuBLAS {us_dense:.1f} us", flush=True)
            rows.append((name, us_fused, "dequantize + cuBLAS", us_deq))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a smaller grid")
    p.add_argument("--only", choices=("decode", "w4a16", "w4a16-splits", "w4a16-rows", "gemv",
                                      "gemv-rotary"),
                   help="tune one kernel")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("tune_kernels.py times CUDA kernels; run it on a GPU machine")
    torch.manual_seed(0)
    print(torch.cuda.get_device_name())
    tuners = {"decode": tune_decode, "w4a16": tune_w4a16, "w4a16-splits": tune_w4a16_splits,
              "w4a16-rows": tune_w4a16_rows,
              "gemv": tune_gemv, "gemv-rotary": tune_gemv_rotary}
    rows = [row for name, tune in tuners.items() if args.only in (None, name)
            for row in tune(args.quick)]
    print("\nsummary")
    for name, base, best, best_us in rows:
        print(f"{name:32s} {base:8.1f} -> {best_us:8.1f} us ({base / best_us:4.2f}x)  {best}")


if __name__ == "__main__":
    main()
