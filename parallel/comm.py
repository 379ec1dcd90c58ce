"""Collectives on an explicit group object (no globals).

`LocalGroup` is the one-rank group (every collective is the identity);
`DistGroup` wraps a torch.distributed process group (NCCL on CUDA, gloo on CPU).
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class LocalGroup:
    rank = 0
    world_size = 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        return x

    def broadcast_object(self, obj: object) -> object:
        return obj

    def barrier(self) -> None:
        pass


class DistGroup:
    """A tensor-parallel group over torch.distributed."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)

    def broadcast_object(self, obj: object) -> object:
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def barrier(self) -> None:
        dist.barrier(group=self.group)


TPGroup = LocalGroup | DistGroup
