"""Choose between a Triton kernel and its plain-torch reference twin.

Triton runs when the tensors live on a CUDA device, or when the environment
sets ``TPSERVE_FORCE_TRITON=1`` (tests use that with ``TRITON_INTERPRET=1`` to
run the Triton kernels through Triton's CPU interpreter).
"""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # triton is Linux-only; the reference twins still work
    HAS_TRITON = False


def use_triton(x: torch.Tensor) -> bool:
    """True when the kernel for a tensor like ``x`` should be the Triton one."""
    if not HAS_TRITON:
        return False
    if os.environ.get("TPSERVE_FORCE_TRITON") == "1":
        return True
    return x.is_cuda


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(x: torch.Tensor) -> int:
    """Streaming multiprocessors of ``x``'s device (a small stand-in on CPU)."""
    if x.is_cuda:
        return _sm_count(x.device.index or 0)
    return 4


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
