# times the joined W4A16 tile of a side branch against the current tile at 64 rows
import importlib.util, sys, itertools, torch, triton.testing
spec = importlib.util.spec_from_file_location("jk", "exp/kernels/__init__.py",
                                              submodule_search_locations=["exp/kernels"])
jk = importlib.util.module_from_spec(spec); sys.modules["jk"] = jk; spec.loader.exec_module(jk)
from jk import w4a16
from jk.testing import random_awq
BF = dict(dtype=torch.bfloat16, device="cuda")
for k, n in ((4096, 14336), (14336, 4096)):
    qw, s, z = random_awq(k, n, 128, **BF)
    for m in (16, 64):
        x = torch.randn(m, k, **BF)
        want = x @ w4a16.awq_dequantize(qw, s, z, 128)
        for bm, bnp, w, joined in itertools.product((m if m == 16 else 64,), (8, 16, 32), (4, 8), (False, True)):
            L = w4a16.GemmLaunch(bm, bnp, 128, w, 3, joined)
            try:
                got = w4a16.w4a16_gemm(x, qw, s, z, 128, launch=L)
                err = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
                us = triton.testing.do_bench_cudagraph(lambda: w4a16.w4a16_gemm(x, qw, s, z, 128, launch=L), rep=50) * 1e3
                print(f"M={m} K={k} N={n} {L}: {us:.1f} us err {err:.1e}", flush=True)
            except Exception as e:
                print(f"M={m} K={k} N={n} {L}: failed {str(e).splitlines()[0][:80]}", flush=True)
