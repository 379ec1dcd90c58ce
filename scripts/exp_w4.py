"""Scratch: W4A16 K splits at 32/64 rows, cold weights."""
import sys
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).parent))
from tune_kernels import bench_cold
from tpserve.kernels import w4a16
from tpserve.kernels import reference as ref
from tpserve.kernels.testing import random_awq
print(torch.cuda.get_device_name(), flush=True)
for k, n in ((4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096), (4096, 3072), (2048, 4096), (4096, 14336), (7168, 4096)):
    qw, sc, qz = random_awq(k, n, 128, dtype=torch.bfloat16, device="cuda")
    dense = torch.randn(n, k, dtype=torch.bfloat16, device="cuda")
    nbytes = qw.nbytes + sc.nbytes + qz.nbytes
    copies = lambda c: [(qw.clone(), sc.clone(), qz.clone()) for _ in range(c)]
    for m in (1, 8, 32, 64):
        x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
        want = ref.w4a16_gemm(x, qw, sc, qz, 128).float()
        cub = bench_cold(lambda w: torch.nn.functional.linear(x, w), dense.nbytes, lambda c: [dense.clone() for _ in range(c)])
        d = w4a16.gemm_launch(m, 128, True)
        line = f"{k}x{n} M={m} cublas {cub:5.1f}"
        for sp in (0,):
            L = w4a16.GemmLaunch(d.block_m, d.block_np, d.block_k, d.num_warps, d.num_stages, d.kind, sp)
            got = w4a16.w4a16_gemm(x, qw, sc, qz, 128, launch=L).float()
            bad = (got - want).abs().max().item() > 1e-2 * want.abs().max().item()
            us = bench_cold(lambda c: w4a16.w4a16_gemm(x, *c, 128, launch=L), nbytes, copies)
            line += f" s{sp}={us:5.1f}" + ("BAD" if bad else "")
        print(line, flush=True)
