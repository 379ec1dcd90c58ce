"""Time tpserve's Triton kernels at Llama-3-8B shapes on one GPU.

Prints achieved GB/s against a device-to-device copy measured in the same run
(the practical bandwidth ceiling), and W4A16 against a bf16 cuBLAS matmul.
Usage: python scripts/bench_kernels.py
"""

from __future__ import annotations

import torch
import triton.testing

import tpserve.kernels as K
from tpserve.kernels.attention_decode import arrival_counters
from tpserve.kernels.kv_cache import int8_scales
from tpserve.kernels.testing import random_awq

NQ, NKV, D, BLOCK, HIDDEN, INTER = 32, 8, 128, 64, 4096, 14336
DEV = "cuda"
BF16 = dict(dtype=torch.bfloat16, device=DEV)
ROWS: list[tuple[str, float, str]] = []


def bench(fn) -> float:
    """Median GPU milliseconds, replayed from a CUDA graph so launch overhead is excluded."""
    fn()
    # do_bench_cudagraph runs fn on a stream of its own, which does not wait for the
    # inputs made on this one: without this, it may read a block table not yet written
    torch.cuda.synchronize()
    try:
        return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
    except Exception:  # not capturable: fall back to eager timing
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def bench_eager(fn) -> float:
    """Median milliseconds of eager calls (includes Python launch overhead)."""
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def report(name: str, ms: float, nbytes: float | None = None, extra: str = "") -> None:
    note = extra
    if nbytes is not None:
        note = f"{nbytes / ms / 1e6:8.0f} GB/s ({nbytes / ms / 1e6 / COPY_GBS:5.1%} of copy) {extra}"
    ROWS.append((name, ms * 1e3, note))
    print(f"{name:44s} {ms * 1e3:9.1f} us  {note}", flush=True)


def copy_bandwidth() -> float:
    a = torch.empty(512 * 2**20, dtype=torch.uint8, device=DEV)
    b = torch.empty_like(a)
    ms = bench_eager(lambda: b.copy_(a))  # one long kernel: launch overhead is noise
    return 2 * a.numel() / ms / 1e6


def bench_elementwise(t: int = 4096) -> None:
    x, res = torch.randn(t, HIDDEN, **BF16), torch.randn(t, HIDDEN, **BF16)
    w = torch.randn(HIDDEN, **BF16)
    report(f"rms_norm T={t}", bench(lambda: K.rms_norm(x, w, 1e-5)), 2 * x.nbytes)
    report(f"fused_add_rms_norm T={t}", bench(lambda: K.fused_add_rms_norm(x, res, w, 1e-5)),
           5 * x.nbytes)
    g = torch.randn(t, 2 * INTER, **BF16)
    report(f"silu_and_mul T={t}", bench(lambda: K.silu_and_mul(g)), g.nbytes * 1.5)
    cache = K.build_cos_sin_cache(torch.rand(D // 2, device=DEV), 8192)
    q, k = torch.randn(t, NQ, D, **BF16), torch.randn(t, NKV, D, **BF16)
    pos = torch.randint(0, 8192, (t,), device=DEV)
    report(f"apply_rotary T={t}", bench(lambda: K.apply_rotary(q, k, pos, cache)),
           2 * (q.nbytes + k.nbytes))


def paged_cache(batch: int, ctx: int, int8: bool, nkv: int = NKV,
                head_major_scales: bool = True):
    """A random cache; an int8 one's scales in the engine's layout (head-major within a
    block) or, for comparison, token-major."""
    blocks_per_seq = -(-ctx // BLOCK)
    nb = batch * blocks_per_seq
    shape = (nb, BLOCK, nkv, D)
    if int8:
        kc = torch.randint(-128, 128, shape, dtype=torch.int8, device=DEV)
        ks, vs = [int8_scales(shape, DEV) if head_major_scales
                  else torch.zeros(nb, BLOCK, nkv, 2, device=DEV) for _ in range(2)]
        for s in (ks, vs):
            s.copy_(torch.rand(nb, BLOCK, nkv, 2, device=DEV) * 0.02)
    else:
        kc, ks, vs = torch.randn(shape, **BF16), None, None
    vc = kc.clone()
    tables = torch.randperm(nb, device=DEV, dtype=torch.int32).view(batch, blocks_per_seq)
    return kc, vc, ks, vs, tables


def bench_store(t: int = 4096) -> None:
    for int8 in (False, True):
        kc, vc, ks, vs, _ = paged_cache(1, t, int8)
        k, v = torch.randn(t, NKV, D, **BF16), torch.randn(t, NKV, D, **BF16)
        slots = torch.randperm(t, device=DEV)
        ms = bench(lambda: K.store_kv_cache(k, v, kc, vc, slots, ks, vs))
        written = 2 * t * NKV * D * kc.element_size()
        report(f"store_kv_cache T={t} {'int8' if int8 else 'bf16'}", ms,
               k.nbytes + v.nbytes + written)


def bench_decode(batch: int, ctx: int, int8: bool = False) -> None:
    """With the splits merged by a reduce kernel and by the split kernel's last
    program (arrival counters, the engine's way)."""
    kc, vc, ks, vs, tables = paged_cache(batch, ctx, int8)
    q = torch.randn(batch, NQ, D, **BF16)
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=DEV)
    qsl = torch.arange(batch + 1, dtype=torch.int32, device=DEV)
    kv_bytes = 2 * batch * ctx * NKV * D * kc.element_size()
    if int8:
        kv_bytes += 2 * batch * ctx * NKV * 2 * 4
    counters = arrival_counters(batch, NKV, DEV)
    for merge, arrivals in (("reduce kernel", None), ("merged in-kernel", counters)):
        fn = lambda: K.paged_attention(q, kc, vc, tables, seq_lens, qsl, 1, ctx,  # noqa: E731
                                       D ** -0.5, None, ks, vs, arrivals=arrivals)
        report(f"decode attn B={batch} ctx={ctx} {'int8' if int8 else 'bf16'} {merge}",
               bench(fn), kv_bytes, f"eager {bench_eager(fn) * 1e3:.1f} us")


def bench_prefill(ctx: int) -> None:
    kc, vc, _, _, tables = paged_cache(1, ctx, False)
    q = torch.randn(ctx, NQ, D, **BF16)
    seq_lens = torch.tensor([ctx], dtype=torch.int32, device=DEV)
    qsl = torch.tensor([0, ctx], dtype=torch.int32, device=DEV)
    ms = bench(lambda: K.paged_attention(q, kc, vc, tables, seq_lens, qsl, ctx, ctx, D ** -0.5))
    flops = 4 * NQ * D * ctx * ctx / 2
    report(f"prefill attn ctx={ctx} (causal)", ms, None, f"{flops / ms / 1e9:6.0f} TFLOP/s")


def bench_w4a16() -> None:
    for k, n in ((4096, 14336), (14336, 4096)):
        qweight, scales, qzeros = random_awq(k, n, 128, **BF16)
        dense = torch.randn(k, n, **BF16)
        wbytes = qweight.nbytes + scales.nbytes + qzeros.nbytes
        for m in (1, 2, 4, 16, 64):
            x = torch.randn(m, k, **BF16)
            t_cublas = bench(lambda: x @ dense)
            t_w4 = bench(lambda: K.w4a16_gemm(x, qweight, scales, qzeros, 128))
            report(f"bf16 cuBLAS  M={m} K={k} N={n}", t_cublas, dense.nbytes)
            eager = bench_eager(lambda: K.w4a16_gemm(x, qweight, scales, qzeros, 128))
            report(f"w4a16        M={m} K={k} N={n}", t_w4, wbytes,
                   f"x{t_cublas / t_w4:4.2f} vs cuBLAS (eager {eager * 1e3:.1f} us)")
            packed, sz = K.int4_tinygemm.pack(qweight, scales, qzeros)
            t_tg = bench(lambda: K.int4_tinygemm.int4_mm(x, packed, sz, 128))
            report(f"int4 tinygemm M={m} K={k} N={n}", t_tg, packed.nbytes + sz.nbytes,
                   f"x{t_cublas / t_tg:4.2f} vs cuBLAS")


def main() -> None:
    global COPY_GBS
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton",
          triton.__version__)
    COPY_GBS = copy_bandwidth()
    report("device-to-device copy 512 MiB", 2 * 512 * 2**20 / COPY_GBS / 1e6,
           2 * 512 * 2**20)
    sections = [bench_elementwise, bench_store]
    for batch, ctx in ((1, 256), (1, 4096), (16, 4096), (64, 2048), (1, 32768)):
        sections.append(lambda b=batch, c=ctx: bench_decode(b, c))
    sections += [lambda: bench_decode(16, 4096, int8=True), lambda: bench_prefill(4096),
                 bench_w4a16]
    for section in sections:
        try:
            section()
        except Exception as exc:  # keep measuring the other kernels
            print(f"FAILED {section}: {exc!r}", flush=True)
    print("\nsummary")
    print(f"{'kernel':44s} {'time':>9s}     achieved")
    for name, us, note in ROWS:
        print(f"{name:44s} {us:9.1f} us  {note}")


COPY_GBS = 1.0

if __name__ == "__main__":
    main()
