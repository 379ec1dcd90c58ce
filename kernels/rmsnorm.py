"""RMSNorm and fused residual-add + RMSNorm (HF LlamaRMSNorm numerics)."""

from __future__ import annotations

import torch

from . import reference
from ._dispatch import HAS_TRITON, next_pow2, use_triton
from .pdl import launch_kwargs

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .pdl import start

    @triton.jit
    def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, new_res_ptr,
                         stride_x, stride_r, stride_o, stride_nr, hidden, eps,
                         HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
        start()  # kernels/pdl.py
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < hidden
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
            # the sum is rounded to the activation dtype, as an eager `x + residual` is
            x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
            tl.store(new_res_ptr + row * stride_nr + cols, x, mask=mask)
        h = x.to(tl.float32)
        var = tl.sum(h * h, axis=0) / hidden
        h = (h * tl.rsqrt(var + eps)).to(x.dtype)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        out = w.to(tl.float32) * h.to(tl.float32)
        tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x, residual, weight, eps):
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty_like(x2)
    rows, hidden = x2.shape
    new_res = res = x2
    if residual is not None:
        res = residual.reshape(-1, hidden).contiguous()
        new_res = torch.empty_like(x2)
    block = next_pow2(hidden)
    warps = norm_warps(block)
    if rows > 0:
        _rms_norm_kernel[(rows,)](
            x2, res, weight, out, new_res, x2.stride(0), res.stride(0),
            out.stride(0), new_res.stride(0), hidden, eps,
            HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=warps,
            **launch_kwargs(x2))
    return out.view(x.shape), new_res.view(x.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x / sqrt(mean(x^2) + eps))``, normalised in float32, output in x.dtype."""
    if not use_triton(x):
        return reference.rms_norm(x, weight, eps)
    return _launch(x, None, weight, eps)[0]


def norm_warps(block: int) -> int:
    """Warps for one program normalizing a row of `block` (a power of 2) columns: 256
    columns a warp, 1 to 16 (the all-reduce joined with the norm takes the same)."""
    return max(1, min(16, block // 256))


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(rms_norm(x + residual), x + residual)``; the sum is in x.dtype."""
    if not use_triton(x):
        return reference.fused_add_rms_norm(x, residual, weight, eps)
    return _launch(x, residual, weight, eps)
