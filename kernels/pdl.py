"""Programmatic dependent launch (PDL, CUDA on Hopper and later).

A decode step at batch 1 is a chain of short kernels, each waiting for the one
before it to finish before it even starts. A kernel launched with `launch_kwargs`
may start while the kernel before it still runs: it calls `wait_prior` before it
reads anything an earlier kernel wrote (`griddepcontrol.wait`), and may do work
that reads no such thing first, as the one-row GEMVs load their first weight
tile. Each kernel of the chain calls `allow_next` at its start, so the kernel
after it may launch as early as the GPU has room.

TPSERVE_PDL=0 turns it off; 1, the default, uses it where the GPU (sm_90+) and
Triton have it. Off, the helpers compile to nothing and kernels launch as usual.
"""
from __future__ import annotations

import os

import torch

from ._dispatch import HAS_TRITON
from .switches import env_choice


def _enabled_from_env() -> bool:
    if env_choice("TPSERVE_PDL", ("0", "1"), "1") == "0" or not HAS_TRITON:
        return False
    if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available():
        return False
    import triton.language as tl
    return (hasattr(tl.extra.cuda, "gdc_wait")
            and torch.cuda.get_device_capability()[0] >= 9)


ENABLED = _enabled_from_env()


def launch_kwargs(x: torch.Tensor) -> dict:
    """Extra launch options of a kernel in the chain, for tensors like x."""
    return dict(launch_pdl=True) if ENABLED and x.is_cuda else {}


if HAS_TRITON:
    import triton
    import triton.language as tl

    _ON = tl.constexpr(ENABLED)

    @triton.jit
    def allow_next():
        """The next kernel in the stream may launch now (it waits for this one)."""
        if _ON:
            tl.extra.cuda.gdc_launch_dependents()

    @triton.jit
    def wait_prior():
        """Block until the kernel before this one has finished, its writes visible."""
        if _ON:
            tl.extra.cuda.gdc_wait()

    @triton.jit
    def start():
        """The whole protocol at a kernel's start, for kernels with nothing to do early."""
        allow_next()
        wait_prior()
