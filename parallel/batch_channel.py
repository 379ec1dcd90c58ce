"""How each step's batch gets from tensor-parallel rank 0 to the other ranks.

`open_batch_channel` picks, collectively, one of two channels with the same
methods (rank 0: `send(batch)`, `stop()`; the others: `recv()`, None after
stop):

- `ShmBatchChannel` when every rank runs on one host: the pickled batch goes
  through a shared-memory ring (shm_ring.py) that the other ranks poll;
- `GlooBatchChannel` otherwise, or with TPSERVE_STEP_CHANNEL=gloo: broadcasts
  on a gloo group.

Both carry a dataclass of integer tensors and ints (a ForwardBatch).
"""
from __future__ import annotations

import dataclasses
import logging
import pickle

import torch
import torch.distributed as dist

from ..kernels.switches import env_choice
from .hosts import same_host
from .process_group import IDLE_TIMEOUT
from .shm_ring import ShmRing

logger = logging.getLogger(__name__)

STEP_CHANNEL_ENV = "TPSERVE_STEP_CHANNEL"


def open_batch_channel(spin_s: float = 0.0) -> "ShmBatchChannel | GlooBatchChannel":
    """This rank's end of the channel. Collective over the default group.

    spin_s: how long a waiting rank polls before it starts to sleep between
    polls (see ShmRing); GPU ranks spin through a decode step.
    """
    group = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    ring = None
    if env_choice(STEP_CHANNEL_ENV, ("auto", "gloo"), "auto") == "auto" and same_host(group):
        ring = _open_ring(group, spin_s)
    return ShmBatchChannel(ring) if ring is not None else GlooBatchChannel(group)


def _open_ring(group: dist.ProcessGroup, spin_s: float) -> ShmRing | None:
    """Rank 0 creates the ring, the others attach; None on every rank if any failed."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    ring, box = None, [None]
    if rank == 0:
        try:
            ring = ShmRing.create(world - 1, spin_s=spin_s)
            box = [ring.path]
        except OSError as exc:
            logger.warning("no shared-memory step channel (%s); using gloo", exc)
    dist.broadcast_object_list(box, src=0, group=group)
    if box[0] is not None and rank != 0:
        try:
            ring = ShmRing.attach(box[0], rank - 1, spin_s=spin_s)
        except (OSError, ValueError) as exc:
            logger.warning("cannot open the shared-memory step channel (%s); using gloo", exc)
    oks: list[bool | None] = [None] * world
    dist.all_gather_object(oks, ring is not None, group=group)
    if rank == 0 and ring is not None:
        ring.unlink()  # every rank has it open (or gave up): the name is no longer needed
    if not all(oks):
        if ring is not None:
            ring.close()
        return None
    return ring


class ShmBatchChannel:
    """The batch pickled into a shared-memory ring; an empty message means stop."""

    def __init__(self, ring: ShmRing) -> None:
        self.ring = ring

    def send(self, obj) -> None:
        self.ring.write(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))

    def stop(self) -> None:
        self.ring.write(b"")

    def recv(self):
        data = self.ring.read()
        return pickle.loads(data) if data else None


class GlooBatchChannel:
    """The batch broadcast over gloo (TCP), for ranks on several hosts.

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

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
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
            if dtype == "none":
                continue
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
        elif value is None:  # an absent optional tensor: part of the schema, no payload
            fields.append((f.name, "none", 0))
        else:
            fields.append((f.name, None, 0))
    return type(obj), fields


def _rebuild(schema: tuple, payload: torch.Tensor, header: list[int]):
    cls, fields = schema
    dims = sum(ndim for _, dtype, ndim in fields if dtype not in (None, "none"))
    shapes, ints = header[:dims], iter(header[dims:])
    values, offset = {}, 0
    for name, dtype, ndim in fields:
        if dtype == "none":
            values[name] = None
            continue
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
