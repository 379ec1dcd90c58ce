"""Collectives on an explicit group object (no globals).

`LocalGroup` is the one-rank group (every collective is the identity);
`DistGroup` wraps a torch.distributed process group (NCCL on CUDA, gloo on CPU);
on GPUs that reach each other over NVLink its small all-reduces take the
one-shot path of symm_all_reduce.py once `prepare_all_reduce` has set it up.

`all_reduce_add_rms_norm` is the all-reduce that ends a row-parallel layer
together with the bias add, residual add and RMSNorm that follow it: one
kernel on the one-shot path, the same steps one by one elsewhere.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..kernels.rmsnorm import fused_add_rms_norm, rms_norm
from ..kernels.peer_slots import SendTarget
from .symm_all_reduce import SymmAllReduce


def _add_rms_norm(x, residual, weight, eps, bias):
    """(rms_norm(h) * weight, h) for h = x + bias + residual; residual None: no add."""
    if bias is not None:
        x = x + bias
    if residual is None:
        return rms_norm(x, weight, eps), x
    return fused_add_rms_norm(x, residual, weight, eps)


class LocalGroup:
    rank = 0
    world_size = 1

    def prepare_all_reduce(self, dtype: torch.dtype, device: torch.device) -> None:
        pass

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def send_target(self, rows: int, hidden: int, dtype: torch.dtype, half: int) -> None:
        return None

    def all_reduce_add_rms_norm(self, x, residual, weight, eps, bias=None, half=0, sent=False):
        return _add_rms_norm(x, residual, weight, eps, bias)

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        return x

    def all_gather_vocab(self, x, vocab_size, half=0, sent=False):
        return x[..., :vocab_size].float()

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
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
        self.one_shot: SymmAllReduce | None = None

    def prepare_all_reduce(self, dtype: torch.dtype, device: torch.device) -> None:
        """Sets up the one-shot path for `dtype` tensors where it works (collective)."""
        self.one_shot = SymmAllReduce.create(self.group or dist.group.WORLD, dtype, device)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over ranks; in place for NCCL/gloo, a new tensor on the one-shot path."""
        if self.one_shot is not None and self.one_shot.fits(x):
            return self.one_shot(x)
        dist.all_reduce(x, group=self.group)
        return x

    def send_target(self, rows: int, hidden: int, dtype: torch.dtype,
                    half: int) -> SendTarget | None:
        """Where the kernel computing `rows` x `hidden` partial sums may send them to the
        other ranks itself, for `all_reduce_add_rms_norm(..., half, sent=True)`: one
        row on the one-shot path (kernels/peer_slots.py), else None."""
        if self.one_shot is None or rows != 1:
            return None
        return self.one_shot.send_target(hidden, dtype, half)

    def all_reduce_add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor | None,
                                weight: torch.Tensor, eps: float,
                                bias: torch.Tensor | None = None, half: int = 0,
                                sent: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(rms_norm(h) * weight, h) for h = all_reduce(x) + bias + residual (residual
        None: no add). Callers alternate `half` between 0 and 1 from one call to the
        next (the one-shot kernel's buffer halves; see symm_all_reduce.py). sent: the
        kernel that computed x sent it to the other ranks already (`send_target`)."""
        if sent:  # the peers' slots hold x: only the one-shot kernel may take it
            out, new_residual = self.one_shot.add_rms_norm(x.reshape(1, -1), residual, weight,
                                                           eps, bias, half, sent=True)
            return out.view(x.shape), new_residual.view(x.shape)
        if self.one_shot is not None and self.one_shot.fits_fused(x):
            return self.one_shot.add_rms_norm(x, residual, weight, eps, bias, half)
        return _add_rms_norm(self.all_reduce(x), residual, weight, eps, bias)

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)

    def all_gather_vocab(self, x: torch.Tensor, vocab_size: int, half: int = 0,
                         sent: bool = False) -> torch.Tensor:
        """[rows, vocab_size] float32 on every rank from each rank's [rows, V/tp] slice of
        a vocab-parallel output: the ranks' slices side by side, trimmed to the real
        vocab. On the one-shot path one kernel, over buffer half `half` (alternating
        with the all-reduces, see all_reduce_add_rms_norm); sent: the kernel that
        computed x sent it to the other ranks already (`send_target`)."""
        if sent or (self.one_shot is not None and self.one_shot.fits_gather(x)):
            return self.one_shot.gather(x, vocab_size, half, sent)
        if self.one_shot is not None and x.shape[0] == 0:
            # an empty gather need not meet the ranks (NCCL may skip it), but the one-shot
            # calls' halves need them to meet between the last all-reduce of a step and
            # the first of the next
            dist.all_reduce(torch.zeros(1, device=x.device), group=self.group)
        return self.all_gather(x, dim=-1)[..., :vocab_size].float()

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's `x` on every rank, in place."""
        dist.broadcast(x, src=0, group=self.group)
        return x

    def broadcast_object(self, obj: object) -> object:
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def barrier(self) -> None:
        dist.barrier(group=self.group)


TPGroup = LocalGroup | DistGroup
