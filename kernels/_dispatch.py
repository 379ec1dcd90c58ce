"""Choose between a Triton kernel and its plain-torch reference twin.

Triton runs when the tensors live on a CUDA device, or when the environment
sets ``TPSERVE_FORCE_TRITON=1`` (tests use that with ``TRITON_INTERPRET=1`` to
run the Triton kernels through Triton's CPU interpreter).
"""

from __future__ import annotations

import functools
import logging
import os

import torch

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # triton is Linux-only; the reference twins still work
    HAS_TRITON = False


def _pdl_from_env() -> bool:
    """Whether the one-row GEMVs launch as programmatic dependents (CUDA's PDL, Hopper
    on): they start while the kernel before them runs, load their first weight tile,
    and wait for that kernel (`griddepcontrol.wait`) before reading its output; the
    kernels before them signal early that they may start. TPSERVE_PDL=0 turns it off;
    1, the default, uses it where the GPU and Triton have it."""
    raw = os.environ.get("TPSERVE_PDL", "1")
    if raw not in ("0", "1"):
        logging.getLogger(__name__).warning("TPSERVE_PDL=%r is not 0 or 1; using 1", raw)
    if raw == "0" or not HAS_TRITON or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    if not torch.cuda.is_available():
        return False
    import triton.language as tl
    return (hasattr(tl.extra.cuda, "gdc_wait")
            and torch.cuda.get_device_capability()[0] >= 9)


PDL = _pdl_from_env()


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
