"""One tensor-parallel rank in its own process (a Ray actor): its group and its runner.

Rank 0 is driven by the executor over a TCP socket (`serve_steps`, see
step_socket.py: a Ray call a step cost milliseconds) and hands each step's
batch to the other ranks (batch_channel.py: shared memory on one host, gloo
across hosts); ranks 1.. sit in `serve` (`while batch := recv():
runner.follow(batch)`). Rank 0 also samples, so only the sampled token ids
(and any logprobs) travel back, not [S, vocab] logits. Where sampling is a plain
argmax every rank takes it too (`mark_sampler`), so that the next step's fed
tokens need no broadcast. scripts/bench_tp.py times each part of a step.
"""
from __future__ import annotations

import os
import time
from typing import Callable, Protocol

import ray
import torch

from ..engine.forward_batch import mark_sampler
from .comm import TPGroup
from .batch_channel import open_batch_channel
from .process_group import init_tp_group, open_store, set_worker_env
from .spin import STEP_SPIN_S
from .step_socket import StepServer


class Runner(Protocol):
    """What the factory builds on each rank (the engine's ModelRunner)."""

    block_size: int
    num_blocks: int
    vocab_size: int

    def execute(self, batch) -> torch.Tensor: ...

    def follow(self, batch) -> None: ...  # ranks 1..: execute, and sample where all ranks do

    def step(self, batch, sampling): ...

    def submit_step(self, batch, sampling): ...  # -> work with done() and result()


RunnerFactory = Callable[[int, TPGroup], Runner]


def local_gpu_index() -> int:
    """This actor's GPU as a CUDA device index of this process.

    The executor asks Ray to leave CUDA_VISIBLE_DEVICES as the node has it, so
    that every rank sees every GPU of the node: symmetric memory (the one-shot
    all-reduce) maps the other ranks' buffers by device index. Ray's GPU id is
    then an entry of the node's CUDA_VISIBLE_DEVICES, or the index itself where
    that is unset. A Ray that narrows the list anyway leaves one entry: index 0.
    """
    gpu = str(ray.get_gpu_ids()[0])
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v]
    if not visible:
        return int(gpu)
    if gpu in visible:
        return visible.index(gpu)
    if len(visible) == 1:
        return 0
    raise RuntimeError(f"Ray gave this rank GPU {gpu}, which is not in this node's "
                       f"CUDA_VISIBLE_DEVICES={','.join(visible)}; start Ray on this node with "
                       f"the same CUDA_VISIBLE_DEVICES the ranks should use")


class TPWorker:
    """Wrapped by `ray.remote` in the executor: one actor per rank (one GPU or one CPU)."""

    def __init__(self, rank: int, world_size: int, use_gpu: bool) -> None:
        self.rank = rank
        self.world_size = world_size
        self.use_gpu = use_gpu
        set_worker_env()
        self.device_index = local_gpu_index() if use_gpu else None
        self.spin_s = STEP_SPIN_S if use_gpu else 0.0  # see spin.py
        self._store = None
        self._steps: StepServer | None = None
        self.channel = None  # batch_channel.py: rank 0 sends each step to the others
        self.runner: Runner | None = None

    def open_rendezvous(self, timeout_s: float) -> tuple[str, int]:
        """Rank 0: binds the rendezvous store to a free port; returns (address, port)."""
        self._store = open_store(self.world_size, timeout_s)
        return ray.util.get_node_ip_address(), self._store.port

    def setup(self, master_addr: str, master_port: int, runner_factory: RunnerFactory,
              timeout_s: float) -> dict[str, int]:
        """Joins the group, builds the runner; returns its block and vocab sizes."""
        device, backend = None, "gloo"
        if self.use_gpu:
            if not torch.cuda.is_available():
                raise RuntimeError(f"rank {self.rank} was given a GPU by Ray but CUDA sees none "
                                   f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')})")
            torch.cuda.set_device(self.device_index)
            device, backend = torch.device("cuda", self.device_index), "nccl"
        group = init_tp_group(self.rank, self.world_size, master_addr, master_port, backend,
                              device, timeout_s, self._store)
        self.channel = open_batch_channel(spin_s=self.spin_s)
        self.runner = runner_factory(self.rank, group)
        return {"num_blocks": self.runner.num_blocks, "block_size": self.runner.block_size,
                "vocab_size": self.runner.vocab_size}

    def execute(self, batch) -> torch.Tensor:
        """Rank 0: hands the batch to the other ranks, runs it with them; logits on the CPU."""
        self.channel.send(batch)
        return self.runner.execute(batch).cpu()

    def launch_step(self, batch, sampling):
        """Rank 0: hands the batch to the other ranks, runs it with them and samples here;
        returns once it is queued on the device, its `.result()` the SamplerOutput on the
        CPU (or None). Serving answers it when done (StepServer)."""
        batch = mark_sampler(batch, sampling)
        self.channel.send(batch)
        return self.runner.submit_step(batch, sampling)

    def time_steps(self, batch, sampling, steps: int) -> dict[str, float]:
        """Rank 0, for benchmarks: mean ms of each part of `step` over `steps` steps."""
        parts = {"send": 0.0, "forward_and_sample": 0.0, "to_cpu": 0.0}
        batch = mark_sampler(batch, sampling)
        for _ in range(steps):
            t0 = time.perf_counter()
            self.channel.send(batch)
            t1 = time.perf_counter()
            sampled = self.runner.step(batch, sampling)
            if self.use_gpu:
                torch.cuda.synchronize()
            t2 = time.perf_counter()
            sampled.to("cpu")
            t3 = time.perf_counter()
            for key, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2)):
                parts[key] += dt * 1e3 / steps
        return parts

    def profile_steps(self, batch, sampling, steps: int) -> str:
        """Rank 0, for benchmarks: the device kernels of `steps` steps (torch.profiler),
        with their summed time a step against the wall time a step: the difference is
        time the device sat idle (launch gaps, waiting for the other ranks)."""
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.use_gpu else [])
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            for _ in range(steps):
                self.launch_step(batch, sampling).result()
            wall_ms = (time.perf_counter() - start) * 1e3 / steps
        events = prof.key_averages()
        attr = "self_device_time_total" if self.use_gpu else "self_cpu_time_total"
        busy_ms = sum(getattr(e, attr) for e in events) / 1e3 / steps
        table = events.table(sort_by=attr, row_limit=15)
        return f"{table}\nwall {wall_ms:.3f} ms a step, kernels {busy_ms:.3f} ms a step"

    def open_step_server(self) -> tuple[str, int, str]:
        """Rank 0: listens for the engine's step connection; (address, port, token)."""
        host = ray.util.get_node_ip_address()
        self._steps = StepServer(host, spin_s=self.spin_s, launch_first=self.use_gpu)
        return host, self._steps.port, self._steps.token

    def serve_steps(self, accept_timeout_s: float) -> int:
        """Rank 0: runs the engine's calls (execute, step, time_steps) until it says
        stop or disconnects; then ends the other ranks' loops. Returns the step count."""
        handlers = {"execute": self.execute, "step": self.launch_step,
                    "time_steps": self.time_steps, "profile_steps": self.profile_steps}
        try:
            return self._steps.serve(handlers, accept_timeout_s, deferred=frozenset({"step"}))
        finally:
            self.stop()

    def serve(self) -> int:
        """Ranks 1..: runs every batch rank 0 sends until it says stop; returns the step count."""
        steps = 0
        while (batch := self.channel.recv()) is not None:
            self.runner.follow(batch)
            steps += 1
        return steps

    def stop(self) -> None:
        """Rank 0: ends the other ranks' `serve` loops (at the end of `serve_steps`)."""
        self.channel.stop()
