"""Tensor-parallel process groups: rendezvous, init, and the step channel.

Rank 0 opens a TCP store on a port the OS picks (port 0), so two engines on
one host never collide and no port is reserved then released; the other ranks
connect to that address. Each rank then holds two groups:

- the compute group (NCCL on CUDA, gloo on CPU) the model's collectives use;
- a gloo control group that carries each step's inputs from rank 0 to the
  others (batch_channel.py). Its timeout is very long because the other ranks
  may wait on it while the engine is idle, and an NCCL wait that long would
  trip the NCCL watchdog.
"""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from .comm import DistGroup, TPGroup

# the GPU machines tpserve targets require multicast (NVLS) off
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
IDLE_TIMEOUT = timedelta(days=365)
HANG_HINT = ("if the ranks run on several nodes, check that they reach each other: set "
             "NCCL_SOCKET_IFNAME (and GLOO_SOCKET_IFNAME) to the network interface they share, "
             "e.g. NCCL_SOCKET_IFNAME=eth0")


class ProcessGroupError(RuntimeError):
    """The ranks could not form their group (unreachable address, timeout)."""


def open_store(world_size: int, timeout_s: float) -> dist.TCPStore:
    """Rank 0's rendezvous store, bound to a free port chosen by the OS (`.port`)."""
    return dist.TCPStore("0.0.0.0", 0, world_size, is_master=True,
                         timeout=timedelta(seconds=timeout_s), wait_for_workers=False)


def set_worker_env() -> None:
    for key, value in NCCL_ENV.items():
        os.environ.setdefault(key, value)


def init_tp_group(rank: int, world_size: int, master_addr: str, master_port: int,
                  backend: str, device_id: torch.device | None = None, timeout_s: float = 600,
                  store: dist.TCPStore | None = None) -> DistGroup:
    """Joins this process to the tensor-parallel group as `rank`.

    backend: "nccl" (pass device_id, this rank's CUDA device) or "gloo".
    store: rank 0's store from `open_store` (the others connect to
    master_addr:master_port).
    """
    set_worker_env()
    timeout = timedelta(seconds=timeout_s)
    try:
        if store is None:
            store = dist.TCPStore(master_addr, master_port, world_size, is_master=False,
                                  timeout=timeout)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                timeout=timeout, device_id=device_id)
        group = DistGroup()
        group.barrier()  # forms the communicator now, where a failure names its cause
    except (RuntimeError, dist.DistError) as exc:
        raise ProcessGroupError(f"rank {rank}/{world_size} could not join the group at "
                                f"{master_addr}:{master_port} over {backend}: {exc}; "
                                f"{HANG_HINT}") from exc
    return group


def join_local_gpus(rank: int, world_size: int, port: int) -> tuple[DistGroup, torch.device]:
    """For tests and benchmarks that start one process per GPU of this machine
    (torch.multiprocessing): joins them as one NCCL group over 127.0.0.1:port,
    rank r on GPU r."""
    set_worker_env()
    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, device_id=device)
    return DistGroup(), device


def min_over_ranks(group: TPGroup, value: int, device: torch.device) -> int:
    """The smallest `value` any rank holds (e.g. KV blocks that fit on every rank)."""
    if group.world_size == 1:
        return value
    local = torch.tensor([value], dtype=torch.int64, device=device)
    return int(group.all_gather(local, dim=0).min())

