"""What the AWQ scale search measures its loss on: a block's output.

As in AutoAWQ, the scales of q/k/v are judged by the attention block's output
and those of gate/up by the MLP's output (over the calibration tokens), so an
error that the block's nonlinearity or the softmax hides costs nothing; o and
down are judged by their own outputs. A block is a picklable callable taking
the candidate weights of its linears (in order) and returning the block's
float32 output; it can travel to a Ray task with its inputs.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


class LinearsBlock:
    """The linears' own outputs for inputs ``x [tokens, C]``."""

    def __init__(self, x: Tensor) -> None:
        self.x = x.float()

    def __call__(self, weights: list[Tensor]) -> Tensor:
        return self.x @ torch.cat([w.float() for w in weights]).t()

    def moved_to(self, device) -> "LinearsBlock":
        return LinearsBlock(self.x.to(device))


class ModuleBlock:
    """``module(*args, **kwargs)`` with the weights of its linears ``names`` swapped in."""

    def __init__(self, module: nn.Module, names: tuple[str, ...], args: tuple, kwargs: dict) -> None:
        self.module, self.names, self.args, self.kwargs = module, names, args, kwargs

    @torch.no_grad()
    def __call__(self, weights: list[Tensor]) -> Tensor:
        linears = [self.module.get_submodule(n) for n in self.names]
        saved = [m.weight.data for m in linears]
        try:
            for m, w in zip(linears, weights):
                m.weight.data = w.to(device=m.weight.device, dtype=m.weight.dtype)
            out = self.module(*self.args, **self.kwargs)
        finally:
            for m, w in zip(linears, saved):
                m.weight.data = w
        return (out[0] if isinstance(out, tuple) else out).float()

    def moved_to(self, device) -> "ModuleBlock":
        """A copy on ``device`` (the module is copied: the caller's stays where it is)."""
        from tpserve.quant.ray_tasks import to_device

        return ModuleBlock(copy.deepcopy(self.module).to(device), self.names,
                           to_device(self.args, device), to_device(self.kwargs, device))
