"""Where a tensor-parallel decode step spends its time.

    python3 scripts/bench_tp.py --tp 2 [--batch 1] [--hidden 4096 --layers 4] [--eager-mode]

Times, on a random Llama: the executor's step as the engine sees it (one call
to rank 0 over the step socket; rank 0 broadcasts the batch, runs and samples),
inside rank 0 the batch broadcast, the forward + sampling and the copy back,
and the round trip of a call that carries a step's arguments but runs nothing;
the step time when each step is submitted before the last one's tokens are read
(async scheduling); then the same model at tp=1 in this process.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_common import model_config, random_workspace  # noqa: E402


def decode_batch(batch_size: int, context: int, block_size: int):
    from tpserve.engine.forward_batch import ForwardBatch

    blocks = -(-(context + 1) // block_size)
    tables = [[b * blocks + i for i in range(blocks)] for b in range(batch_size)]
    return ForwardBatch.build([[7]] * batch_size, [context] * batch_size, tables, block_size)


def greedy_rows(n: int):
    from tpserve.engine.request import Request
    from tpserve.engine.sampler import SamplingBatch
    from tpserve.engine.sampling_params import SamplingParams

    rows = [Request.new(f"r{i}", [7], SamplingParams(temperature=0)) for i in range(n)]
    return SamplingBatch.build(rows, 1 << 30)


def workspace(cfg, path: Path, tp: int) -> Path:
    """A random workspace at `path`, made unless a finished one is there."""
    from tpserve.engine.workspace import CONFIG_FILE

    if not (path / CONFIG_FILE).exists():  # written last
        random_workspace(cfg, path, tp)
    return path


def pipelined(runner, batch, fed, sampling, steps: int) -> float:
    """ms a step when each step is submitted before the last one's tokens are read (async
    scheduling), its input ids fed from those tokens on the device."""
    def run(n):
        pending = runner.submit_step(batch, sampling)
        for _ in range(n):
            ahead = runner.submit_step(fed, sampling)
            pending.result()
            pending = ahead
        pending.result()

    run(3)
    start = time.perf_counter()
    run(steps)
    return (time.perf_counter() - start) / (steps + 1) * 1e3


def timed(fn, steps: int) -> float:
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--context", type=int, default=200)
    p.add_argument("--shape", default="llama3-8b")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--eager-mode", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--profile", action="store_true",
                   help="also print rank 0's kernel table (torch.profiler) for the tp step")
    p.add_argument("--workspace-dir", type=Path,
                   help="keep the random workspaces here and reuse them (default: a temp dir)")
    args = p.parse_args()

    from tpserve.engine.config import EngineConfig
    from tpserve.engine.model_runner import ModelRunner
    from tpserve.engine.workspace import read_meta
    from tpserve.parallel.executor import RayExecutor

    cfg = model_config(args.shape, args.layers)
    tmp = args.workspace_dir or Path(tempfile.mkdtemp(prefix="bench_tp-"))
    name = f"{args.shape}-{args.layers}l"
    config = EngineConfig(cache_max_entry_count=256, cache_block_seq_len=64, device=args.device,
                          eager_mode=args.eager_mode, max_batch_size=max(8, args.batch))
    batch = decode_batch(args.batch, args.context, 64)
    fed = dataclasses.replace(batch, fed_rows=torch.arange(args.batch))  # every id: last step's
    sampling = greedy_rows(args.batch)
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    ws = workspace(cfg, tmp / f"{name}-tp{args.tp}", args.tp)
    ex = RayExecutor(args.tp, functools.partial(ModelRunner, ws, read_meta(ws), config),
                     device=args.device)
    total = timed(lambda: ex.submit_step(batch, sampling).result(), args.steps)
    ahead = pipelined(ex, batch, fed, sampling, args.steps)
    parts = ex._call("time_steps", batch, sampling, args.steps)  # timed inside rank 0
    # the engine <-> rank 0 link alone: a call with a step's arguments that does no step
    round_trip = timed(lambda: ex._call("time_steps", batch, sampling, 0), args.steps)
    if args.profile:
        print(ex._call("profile_steps", batch, sampling, min(args.steps, 20)))
    ex.shutdown()
    ws1 = workspace(cfg, tmp / f"{name}-tp1", 1)
    runner = ModelRunner(ws1, read_meta(ws1), config)

    def local():
        runner.step(batch, sampling).token_ids.tolist()

    tp1 = timed(local, args.steps)
    tp1_ahead = pipelined(runner, batch, fed, sampling, args.steps)
    print(f"{card}: {args.shape} x{args.layers} layers, batch {args.batch}, "
          f"{'CUDA graphs' if torch.cuda.is_available() and not args.eager_mode else 'eager'}")
    print(f"tp=1 in process: {tp1:.3f} ms/step; submitted one ahead {tp1_ahead:.3f}")
    print(f"tp={args.tp} executor:  {total:.3f} ms/step; inside rank 0: "
          + ", ".join(f"{k} {v:.3f}" for k, v in parts.items())
          + f"; an empty call's round trip {round_trip:.3f}")
    print(f"tp={args.tp} executor, submitted one ahead (async scheduling): {ahead:.3f} ms/step")


if __name__ == "__main__":
    main()
