"""4-bit weights through PyTorch's own int4 matmul (tinygemm), for bf16 on CUDA.

PyTorch ships tensor-core W4A16 kernels as ``aten._weight_int4pack_mm`` (the
kernels gpt-fast and torchao's int4 weight-only mode use). They want their own
packing, made once at load time from AutoAWQ's:

- the 4-bit codes as [N, K/2] uint8 (K index 2i in the high nibble, 2i+1 in the
  low one), tiled by ``aten._convert_weight_to_int4pack``;
- ``scales_and_zeros`` [K/G, N, 2] bf16 with w = (q - 8) * scale + zero, so
  AWQ's w = (q - z) * s gives scale = s and zero = (8 - z) * s.

The zero is rounded to bf16 (AWQ keeps z exact): an error of at most 2^-9 of
(8 - z) * s, small against the rounding of the 4-bit codes themselves (s / 2).

Only bf16 activations, group sizes 32..256, K a multiple of 128 and NVIDIA GPUs of
compute capability 8.0+ qualify (`supports`); other models keep the Triton kernel
(w4a16.py).
"""
from __future__ import annotations

import torch

from .reference import unpack_awq

INNER_K_TILES = 8  # the packing's K tile: K must be a multiple of 16 * INNER_K_TILES
GROUP_SIZES = (32, 64, 128, 256)


def device_supported(device: torch.device) -> bool:
    """A CUDA device the int4 matmul runs on: its kernels need compute capability 8.0+
    (and bf16); ROCm builds lack them."""
    return (device.type == "cuda" and torch.version.hip is None
            and torch.cuda.get_device_capability(device) >= (8, 0)
            and hasattr(torch.ops.aten, "_weight_int4pack_mm"))


def supports(dtype: torch.dtype, device: torch.device, in_features: int,
             group_size: int) -> bool:
    return (dtype == torch.bfloat16 and group_size in GROUP_SIZES
            and in_features % (16 * INNER_K_TILES) == 0 and device_supported(device))


def awq_to_codes(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """AutoAWQ GEMM packing -> (codes [N, K/2] uint8 as the int4 packer wants them,
    scales_and_zeros [K/G, N, 2] in the scales' dtype). Plain torch, any device."""
    q = unpack_awq(qweight).t()  # [N, K]
    codes = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8)
    s = scales.float()
    zero = (8.0 - unpack_awq(qzeros).float()) * s
    scales_and_zeros = torch.stack([s, zero], dim=-1).to(scales.dtype).contiguous()
    return codes.contiguous(), scales_and_zeros


def dequantize_codes(codes: torch.Tensor, scales_and_zeros: torch.Tensor,
                     group_size: int) -> torch.Tensor:
    """[K, N] weights (q - 8) * scale + zero from `awq_to_codes`' output (the reference)."""
    hi, lo = (codes >> 4).int(), (codes & 0xF).int()
    q = torch.stack([hi, lo], dim=-1).reshape(codes.shape[0], -1).t().float()  # [K, N]
    scale = scales_and_zeros[..., 0].float().repeat_interleave(group_size, dim=0)
    zero = scales_and_zeros[..., 1].float().repeat_interleave(group_size, dim=0)
    return ((q - 8.0) * scale + zero).to(scales_and_zeros.dtype)


def pack(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(int4pack, scales_and_zeros) for `int4_mm`, on qweight's (CUDA) device."""
    codes, scales_and_zeros = awq_to_codes(qweight, scales, qzeros)
    return torch.ops.aten._convert_weight_to_int4pack(codes, INNER_K_TILES), scales_and_zeros


def int4_mm(x: torch.Tensor, int4pack: torch.Tensor, scales_and_zeros: torch.Tensor,
            group_size: int) -> torch.Tensor:
    """x [M, K] bf16 @ W [K, N] -> [M, N] bf16."""
    return torch.ops.aten._weight_int4pack_mm(x, int4pack, group_size, scales_and_zeros)
