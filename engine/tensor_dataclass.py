"""The per-step dataclasses of tensors: moving them between devices, and pickling them fast.

A ForwardBatch goes to tensor-parallel rank 0 through a Ray call on every step,
and a SamplerOutput comes back. torch's own tensor pickling costs about 0.3 ms a
tensor, which made those calls take milliseconds; a numpy array of the same
bytes pickles in microseconds. CPU tensor fields travel as numpy arrays and are
turned back into tensors (sharing the unpickled memory) on the other side.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch


def _rebuild(cls, values: dict):
    return cls(**{k: _tensor(v) if isinstance(v, np.ndarray) else v for k, v in values.items()})


def _tensor(array: np.ndarray) -> torch.Tensor:
    # Ray hands out read-only zero-copy buffers; torch wants writable memory
    return torch.from_numpy(array if array.flags.writeable else array.copy())


class TensorDataclass:
    """Mixin for dataclasses with tensor fields: `to(device)`, and tensor fields on the CPU
    pickle as numpy arrays."""

    def to(self, device: torch.device | str, non_blocking: bool = False):
        """A copy with every tensor field on `device` (non_blocking: only towards a GPU,
        where the copy is ordered before the kernels that read it)."""
        return dataclasses.replace(self, **{
            f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
            for f in dataclasses.fields(self) if isinstance(getattr(self, f.name), torch.Tensor)})

    def __reduce__(self):
        values = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor) and value.device.type == "cpu" \
                    and value.dtype != torch.bfloat16:
                value = value.numpy()
            values[f.name] = value
        return _rebuild, (type(self), values)
