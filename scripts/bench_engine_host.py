#!/usr/bin/env python3
"""What `LLMEngine.step` costs the host per step, without a model: no GPU needed.

    python scripts/bench_engine_host.py [--batch 1 16 64] [--profile] [--no-async-scheduling]
    python scripts/bench_engine_host.py --device-ms 3     # with a simulated device step

A runner that samples a fixed token at once stands in for the model, so the
time a step takes is the engine's own work on the host: scheduling, building
the ForwardBatch and SamplingBatch, appending tokens, detokenizing, checking
stop conditions. One step at a time, that work sits between two steps on the
device; with async scheduling it overlaps the device's. `--device-ms` makes the
runner a simulated device that takes that long a step, one step after the
other, and prints the step time with async scheduling and without.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

from tpserve.engine.config import EngineConfig
from tpserve.engine.llm_engine import LLMEngine
from tpserve.engine.model_runner import Launched
from tpserve.engine.sampler import SamplerOutput
from tpserve.engine.sampling_params import SamplingParams


class InstantRunner:
    """Every sampled row gets token 7 (a token the tokenizer decodes to text)."""

    def __init__(self, num_blocks: int, block_size: int, vocab_size: int) -> None:
        self.num_blocks, self.block_size, self.vocab_size = num_blocks, block_size, vocab_size
        self.device = torch.device("cpu")

    def submit_step(self, batch, sampling):
        rows = 0 if sampling is None else len(sampling.steps)
        return Launched(SamplerOutput(torch.full((rows,), 7, dtype=torch.int64)))


class SimulatedDeviceRunner(InstantRunner):
    """A device that runs queued steps one after the other, `device_s` each: a step's
    tokens are ready device_s after it was submitted or the step before it ended."""

    def __init__(self, num_blocks: int, block_size: int, vocab_size: int,
                 device_s: float) -> None:
        super().__init__(num_blocks, block_size, vocab_size)
        self.device_s = device_s
        self._free_at = 0.0

    def submit_step(self, batch, sampling):
        self._free_at = max(time.perf_counter(), self._free_at) + self.device_s
        return _Ready(super().submit_step(batch, sampling), self._free_at)


class _Ready:
    def __init__(self, launched: Launched, at: float) -> None:
        self.launched, self.at = launched, at

    def result(self):
        while time.perf_counter() < self.at:
            pass
        return self.launched.result()


class ByteDecoder:
    """A tokenizer stand-in that decodes ids to letters (detokenization does real work)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + t % 26) for t in ids)


def run(batch: int, steps: int, prompt_len: int, profile: bool,
        async_scheduling: bool = True, device_ms: float = 0.0) -> float:
    config = EngineConfig(max_batch_size=batch, session_len=prompt_len + steps + 64,
                          cache_block_seq_len=64, async_scheduling=async_scheduling)
    blocks = batch * ((prompt_len + steps + 64) // 64 + 2)
    runner = SimulatedDeviceRunner(blocks, 64, 32000, device_ms / 1e3) if device_ms \
        else InstantRunner(blocks, 64, 32000)
    engine = LLMEngine(runner, ByteDecoder(), config)
    params = SamplingParams(temperature=0, max_tokens=steps + 10, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"r{i}", list(range(1, prompt_len + 1)), params)
    while engine.scheduler.waiting:  # prefill everyone first
        engine.step()
    profiler = cProfile.Profile() if profile else None
    start = time.perf_counter()
    if profiler:
        profiler.enable()
    loop = engine.steps()  # as the server steps
    for _ in range(steps):
        next(loop)
    if profiler:
        profiler.disable()
    per_step = (time.perf_counter() - start) / steps * 1e6
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(15)
    return per_step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--profile", action="store_true", help="print the hottest functions")
    p.add_argument("--no-async-scheduling", action="store_true",
                   help="one step at a time (async scheduling adds the pending-token "
                   "bookkeeping, and overlaps the device on a GPU)")
    p.add_argument("--device-ms", type=float, default=0.0,
                   help="> 0: a simulated device step of this many ms; prints the step time "
                   "with async scheduling and one step at a time")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.device_ms:
        print(f"simulated device step {args.device_ms} ms")
        print(f"{'batch':>5s} {'async us':>9s} {'sync us':>9s} {'sync/async':>10s}")
        for batch in args.batch:
            fast, slow = (run(batch, args.steps, args.prompt_len, False, mode, args.device_ms)
                          for mode in (True, False))
            print(f"{batch:5d} {fast:9.1f} {slow:9.1f} {slow / fast:10.2f}", flush=True)
        return
    print(f"{'batch':>5s} {'us a step':>10s} {'us a row':>9s}")
    for batch in args.batch:
        us = run(batch, args.steps, args.prompt_len, args.profile, not args.no_async_scheduling)
        print(f"{batch:5d} {us:10.1f} {us / batch:9.1f}", flush=True)


if __name__ == "__main__":
    main()
