"""A one-shot all-reduce over symmetric memory, for decode-sized messages.

A decode step all-reduces a few KB twice per layer. NCCL's all-reduce costs
~22 us a call at that size inside a CUDA graph on 2 x H200, this one-shot
path 7-11 us (scripts/bench_all_reduce.py). The one-shot all-reduce of torch's symmetric memory
copies the local input into a buffer every rank can read over NVLink, meets
the other ranks at a barrier of signal pads, and sums all ranks' buffers
itself; it needs no multicast (NVLS), and a barrier at its end lets the next
call reuse the buffer. It works inside CUDA graphs: the buffer never moves.

`SymmAllReduce.create` returns None where it cannot work (ranks on several
nodes, no symmetric memory in this torch build, no peer access between the
GPUs), so the caller keeps NCCL. Larger messages (prefill) always go to NCCL,
which is faster there. TPSERVE_ALLREDUCE=nccl turns the one-shot path off.
"""
from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

from .hosts import same_host

logger = logging.getLogger(__name__)

# up to 64 decode rows of a 4096-wide bf16 hidden state; past that NCCL catches up
MAX_BYTES = 512 * 1024


class SymmAllReduce:
    """Sums a small CUDA tensor over the group's ranks through one symmetric buffer."""

    def __init__(self, group: dist.ProcessGroup, dtype: torch.dtype, device: torch.device,
                 max_bytes: int = MAX_BYTES) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        try:  # CUDA peer memory; NVSHMEM (where installed) needs a bootstrap of its own
            symm_mem.set_backend("CUDA")
        except (RuntimeError, AttributeError):
            pass  # chosen already, or a torch with one backend
        self.group_name = group.group_name
        self.dtype = dtype
        self.buffer = symm_mem.empty(max_bytes // dtype.itemsize, dtype=dtype, device=device)
        symm_mem.rendezvous(self.buffer, self.group_name)

    @classmethod
    def create(cls, group: dist.ProcessGroup, dtype: torch.dtype,
               device: torch.device) -> SymmAllReduce | None:
        """A checked instance, or None where the one-shot path cannot run here.
        Collective: every rank of the group calls it with the same arguments."""
        if os.environ.get("TPSERVE_ALLREDUCE", "auto") == "nccl":
            return None
        if not same_host(group):  # peer memory reaches only the GPUs of one node
            return None
        if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16, torch.float32):
            return None
        fast = None
        try:
            fast = cls(group, dtype, device)
            probe = torch.full((1024,), float(dist.get_rank(group) + 1), dtype=dtype,
                               device=device)
            got = fast(probe)
            world = dist.get_world_size(group)
            ok = bool((got == world * (world + 1) / 2).all())
        except Exception as exc:  # noqa: BLE001  any failure here only means: keep NCCL
            logger.warning("one-shot all-reduce unavailable (%s); using NCCL", exc)
            ok = False
        # every rank must take the same path, or their collectives would not match
        flag = torch.tensor([int(ok)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
        return fast if ok and flag.item() == 1 else None

    def fits(self, x: torch.Tensor) -> bool:
        return (x.dtype == self.dtype and x.is_contiguous()
                and x.numel() <= self.buffer.numel())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        staging = self.buffer[:x.numel()].view(x.shape)  # the op wants equal shapes
        return torch.ops.symm_mem.one_shot_all_reduce_copy(staging, x, "sum", self.group_name)
