"""Group-wise asymmetric integer quantization of linear weights (AWQ's W4 g128).

A Hugging Face linear weight is ``[N, K]`` (out x in). Groups are ``group_size``
consecutive input channels of one output row. Per group::

    lo, hi = min(w, 0), max(w, 0)        # the range always holds 0
    scale  = (hi - lo) / (2**bits - 1)   # guarded against 0
    zero   = clamp(round(-lo / scale), 0, 2**bits - 1)
    q      = clamp(round(w / scale) + zero, 0, 2**bits - 1)
    w     ~= (q - zero) * scale

Widening the range to hold 0 keeps ``zero`` inside the integer range, so no
group is ever clamped and ``|w - dequant(q)| <= scale / 2`` holds everywhere;
for the zero-centred weights of LLMs it changes nothing.

Outputs use the checkpoint orientation: ``intweight [K, N]``, ``scales`` and
``zeros`` ``[K // G, N]``.
"""

import torch
from torch import Tensor

from tpserve.quant.pack import unpack_awq

_MIN_SCALE = 1e-8


def _check_shape(w: Tensor, bits: int, group_size: int) -> None:
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D [out, in] weight, got shape {tuple(w.shape)}")
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    if group_size <= 0 or w.shape[1] % group_size:
        raise ValueError(
            f"group_size {group_size} must divide the input dimension {w.shape[1]}"
        )


def _group_params(groups: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """``groups [N, K // G, G]`` float -> ``(scale, zero)`` each ``[N, K // G, 1]``."""
    qmax = 2**bits - 1
    lo = groups.amin(dim=-1, keepdim=True).clamp(max=0)
    hi = groups.amax(dim=-1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / qmax).clamp(min=_MIN_SCALE)
    zero = torch.round(-lo / scale).clamp(0, qmax)
    return scale, zero


def _grouped(w: Tensor, group_size: int) -> Tensor:
    n, k = w.shape
    return w.float().reshape(n, k // group_size, group_size)


def quantize_groupwise(
    w: Tensor, bits: int = 4, group_size: int = 128
) -> tuple[Tensor, Tensor, Tensor]:
    """``w [N, K]`` -> ``(intweight [K, N] int32, scales [K//G, N] float32, zeros [K//G, N] int32)``."""
    _check_shape(w, bits, group_size)
    groups = _grouped(w, group_size)
    scale, zero = _group_params(groups, bits)
    q = (torch.round(groups / scale) + zero).clamp(0, 2**bits - 1)
    n, k = w.shape
    intweight = q.reshape(n, k).t().contiguous().to(torch.int32)
    return intweight, scale.squeeze(-1).t().contiguous(), zero.squeeze(-1).t().contiguous().to(torch.int32)


def dequantize_groupwise(intweight: Tensor, scales: Tensor, zeros: Tensor) -> Tensor:
    """Inverse of ``quantize_groupwise``: returns the float32 weight ``[N, K]`` (HF orientation)."""
    k, n = intweight.shape
    groups = scales.shape[0]
    if k % groups or scales.shape != zeros.shape or scales.shape[1] != n:
        raise ValueError(
            f"inconsistent shapes: intweight {tuple(intweight.shape)}, scales "
            f"{tuple(scales.shape)}, zeros {tuple(zeros.shape)}"
        )
    group_size = k // groups
    s = scales.float().repeat_interleave(group_size, dim=0)
    z = zeros.float().repeat_interleave(group_size, dim=0)
    return ((intweight.float() - z) * s).t().contiguous()


def fake_quantize(w: Tensor, bits: int = 4, group_size: int = 128) -> Tensor:
    """Quantize then dequantize ``w [N, K]``; same shape and dtype (used by the AWQ searches)."""
    _check_shape(w, bits, group_size)
    groups = _grouped(w, group_size)
    scale, zero = _group_params(groups, bits)
    q = (torch.round(groups / scale) + zero).clamp(0, 2**bits - 1)
    return ((q - zero) * scale).reshape(w.shape).to(w.dtype)


def dequantize_awq(qweight: Tensor, qzeros: Tensor, scales: Tensor) -> Tensor:
    """A packed AWQ linear (``qweight [K, N/8]``, ``qzeros [K/G, N/8]``, ``scales [K/G, N]``) -> float32 ``[N, K]``."""
    intweight, zeros = unpack_awq(qweight, qzeros)
    return dequantize_groupwise(intweight, scales, zeros)
