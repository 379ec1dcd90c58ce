"""Where the ranks of a group run."""
from __future__ import annotations

import socket

import torch.distributed as dist


def same_host(group: dist.ProcessGroup | None = None) -> bool:
    """Whether every rank of the group runs on this host. Collective."""
    hosts: list[str | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(hosts, socket.gethostname(), group=group)
    return len(set(hosts)) == 1
