"""Tensor-parallel process groups: rendezvous, init, and the step channel.

Rank 0 opens a TCP store on a port the OS picks (port 0), so two engines on
one host never collide and no port is reserved then released; the other ranks
connect to that address. Each rank then holds two groups:

- the compute group (NCCL on CUDA, gloo on CPU) the model's collectives use;
- a gloo control group on which rank 0 broadcasts each step's inputs
  (`BatchChannel`). Its timeout is very long because the other ranks block on
  it while the engine is idle, and an NCCL wait that long would trip the
  NCCL watchdog.
"""
from __future__ import annotations

import dataclasses
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


class BatchChannel:
    """Rank 0 sends a dataclass of integer tensors and ints; the other ranks receive it.

    Per step: one fixed-size message, a header (command, payload length, shapes,
    int fields) followed by the int64 payload with every tensor flattened; a
    payload too long for it follows in a second broadcast. (A decode step fits
    in one; each gloo broadcast costs a few hundred microseconds on the step's
    critical path.) The dataclass type and field layout travel once (pickled)
    and whenever they change.
    """

    STEP, SCHEMA, STOP = 1, 2, 3
    HEADER_LEN = 64
    MESSAGE_LEN = 4096  # int64s: header and, when it fits, the payload

    def __init__(self) -> None:
        self.group = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
        self.rank = dist.get_rank()
        self._schema: tuple | None = None  # (cls, [(name, dtype or None, ndim)])

    def send(self, obj) -> None:
        schema = _schema_of(obj)
        if schema != self._schema:
            self._header(self.SCHEMA, 0)
            box = [schema]
            dist.broadcast_object_list(box, src=0, group=self.group)
            self._schema = schema
        shapes, ints, parts = [], [], []
        for (name, dtype, _), value in zip(schema[1], _values(obj)):
            if dtype is None:
                ints.append(int(value))
            else:
                shapes.extend(value.shape)
                parts.append(value.reshape(-1).to(torch.int64))
        payload = torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)
        inline = payload.numel() <= self.MESSAGE_LEN - self.HEADER_LEN
        self._header(self.STEP, payload.numel(), shapes + ints, payload if inline else None)
        if not inline:
            dist.broadcast(payload, src=0, group=self.group)

    def stop(self) -> None:
        self._header(self.STOP, 0)

    def recv(self):
        """The next object rank 0 sent, or None when it sent stop."""
        while True:
            message = torch.empty(self.MESSAGE_LEN, dtype=torch.int64)
            dist.broadcast(message, src=0, group=self.group)
            cmd, size, *rest = message[:self.HEADER_LEN].tolist()
            if cmd == self.STOP:
                return None
            if cmd == self.SCHEMA:
                box = [None]
                dist.broadcast_object_list(box, src=0, group=self.group)
                self._schema = box[0]
                continue
            if size <= self.MESSAGE_LEN - self.HEADER_LEN:
                payload = message[self.HEADER_LEN:self.HEADER_LEN + size]
            else:
                payload = torch.empty(size, dtype=torch.int64)
                dist.broadcast(payload, src=0, group=self.group)
            return _rebuild(self._schema, payload, rest)

    def _header(self, cmd: int, size: int, fields: list[int] = (),
                payload: torch.Tensor | None = None) -> None:
        message = torch.zeros(self.MESSAGE_LEN, dtype=torch.int64)
        header = message[:self.HEADER_LEN]
        values = [cmd, size, *fields]
        if len(values) > self.HEADER_LEN:
            raise ValueError(f"a step message has {len(values)} header fields, "
                             f"more than {self.HEADER_LEN}")
        header[:len(values)] = torch.tensor(values, dtype=torch.int64)
        if payload is not None:
            message[self.HEADER_LEN:self.HEADER_LEN + payload.numel()] = payload
        dist.broadcast(message, src=0, group=self.group)


def _values(obj) -> list:
    return [getattr(obj, f.name) for f in dataclasses.fields(obj)]


def _schema_of(obj) -> tuple:
    fields = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() or value.is_complex():
                raise TypeError(f"{f.name}: only integer tensors can be broadcast, got {value.dtype}")
            fields.append((f.name, value.dtype, value.dim()))
        else:
            fields.append((f.name, None, 0))
    return type(obj), fields


def _rebuild(schema: tuple, payload: torch.Tensor, header: list[int]):
    cls, fields = schema
    dims = sum(ndim for _, dtype, ndim in fields if dtype is not None)
    shapes, ints = header[:dims], iter(header[dims:])
    values, offset = {}, 0
    for name, dtype, ndim in fields:
        if dtype is None:
            values[name] = next(ints)
            continue
        shape, shapes = shapes[:ndim], shapes[ndim:]
        numel = 1
        for d in shape:
            numel *= d
        values[name] = payload[offset:offset + numel].view(shape).to(dtype)
        offset += numel
    return cls(**values)
