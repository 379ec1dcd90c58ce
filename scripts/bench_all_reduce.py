"""NCCL's all-reduce against the one-shot symmetric-memory one at decode sizes.

    python3 scripts/bench_all_reduce.py [--world 2] [--hidden 4096]

Each rank replays a CUDA graph of 64 back-to-back all-reduces of [rows, hidden]
bf16 (what a 32-layer decode step does) and reports the time per call; then the
same for each all-reduce followed by its residual add and RMSNorm: the one-shot
all-reduce and the fused add + norm kernel, against the joined kernel.
"""
from __future__ import annotations

import argparse
import os
import socket

import torch
import torch.multiprocessing as mp

ROWS = (1, 8, 32, 64)
CALLS = 64


def per_call_us(fn, x: torch.Tensor) -> float:
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn(x)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = x
        for _ in range(CALLS):
            y = fn(y)
    for _ in range(5):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 20 / CALLS * 1e3


def rank_main(rank: int, world: int, port: int, hidden: int) -> None:
    import torch.distributed as dist

    from tpserve.kernels import fused_add_rms_norm
    from tpserve.parallel.process_group import join_local_gpus

    group, device = join_local_gpus(rank, world, port)
    group.prepare_all_reduce(torch.bfloat16, device)

    def nccl(x):
        dist.all_reduce(x)
        return x

    weight = torch.ones(hidden, dtype=torch.bfloat16, device=device)
    calls = iter(range(1 << 30))

    def then_norm(x):
        residual = x  # stands for the residual stream: same shape, read and rewritten
        return fused_add_rms_norm(group.all_reduce(x), residual, weight, 1e-5)[0]

    def joined(x):
        return group.all_reduce_add_rms_norm(x, x, weight, 1e-5, None, next(calls) % 2)[0]

    for rows in ROWS:
        x = torch.full((rows, hidden), 1e-3, dtype=torch.bfloat16, device=device)
        t_nccl = per_call_us(nccl, x)
        t_fast = per_call_us(group.all_reduce, x) if group.one_shot else float("nan")
        t_then = per_call_us(then_norm, x) if group.one_shot else float("nan")
        t_joined = per_call_us(joined, x) if group.one_shot else float("nan")
        if rank == 0:
            print(f"{torch.cuda.get_device_name()} x{world}  [{rows:3d}, {hidden}] bf16: "
                  f"NCCL {t_nccl:6.1f} us  one-shot {t_fast:6.1f} us  "
                  f"({t_nccl / t_fast:.2f}x)  | + add & norm: separate {t_then:6.1f} us  "
                  f"joined {t_joined:6.1f} us ({t_then / t_joined:.2f}x)", flush=True)
    dist.barrier()
    torch.cuda.synchronize()
    os._exit(0)  # destroy_process_group can wait forever on symmetric-memory teardown


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--hidden", type=int, default=4096)
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(rank_main, args=(args.world, port, args.hidden), nprocs=args.world)


if __name__ == "__main__":
    main()
