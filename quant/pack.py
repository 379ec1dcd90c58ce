"""AutoAWQ "GEMM" int4 packing, the layout of AWQ checkpoints on the Hugging Face hub.

Eight 4-bit values share one int32. For a matrix ``[rows, N]`` of integers in
0..15 the packed matrix is ``[rows, N // 8]`` int32, and nibble ``i`` (bits
``4i .. 4i+3``) of packed column ``c`` holds column ``c * 8 + AWQ_ORDER[i]``.
The interleaved order lets the GEMM kernel unpack pairs of fp16 values with
one shift-and-mask per pair.

The same layout serves ``qweight`` (``[in, out]`` -> ``[in, out // 8]``) and
``qzeros`` (``[in // group, out]`` -> ``[in // group, out // 8]``).
"""

import torch
from torch import Tensor

PACK_FACTOR = 8
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
# Inverse permutation: the nibble that holds column offset j.
AWQ_REVERSE_ORDER = tuple(AWQ_ORDER.index(j) for j in range(PACK_FACTOR))


def pack_int4(values: Tensor) -> Tensor:
    """Pack ``[rows, N]`` integers in 0..15 into ``[rows, N // 8]`` int32 (AWQ order)."""
    if values.dim() != 2:
        raise ValueError(f"pack_int4 expects a 2-D tensor, got shape {tuple(values.shape)}")
    rows, cols = values.shape
    if cols % PACK_FACTOR:
        raise ValueError(f"the packed dimension ({cols}) must be a multiple of {PACK_FACTOR}")
    v = values.to(torch.int64)
    if v.numel() and (v.min() < 0 or v.max() > 15):
        raise ValueError("int4 values must lie in 0..15")
    v = v.reshape(rows, cols // PACK_FACTOR, PACK_FACTOR)
    packed = torch.zeros(rows, cols // PACK_FACTOR, dtype=torch.int64, device=values.device)
    for nibble, col in enumerate(AWQ_ORDER):
        packed |= v[..., col] << (4 * nibble)
    # Reinterpret the unsigned 32-bit pattern as int32 (two's complement).
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return packed.to(torch.int32)


def unpack_int4(packed: Tensor) -> Tensor:
    """Inverse of ``pack_int4``: ``[rows, M]`` int32 -> ``[rows, M * 8]`` int32 in 0..15."""
    if packed.dtype != torch.int32:
        raise ValueError(f"packed int4 tensors are int32, got {packed.dtype}")
    rows, words = packed.shape
    shifts = torch.tensor([4 * n for n in AWQ_REVERSE_ORDER], dtype=torch.int32, device=packed.device)
    nibbles = (packed.unsqueeze(-1) >> shifts) & 0xF
    return nibbles.reshape(rows, words * PACK_FACTOR)


def pack_awq(intweight: Tensor, zeros: Tensor) -> tuple[Tensor, Tensor]:
    """``intweight [K, N]`` and ``zeros [K // G, N]`` (0..15) -> ``(qweight, qzeros)`` int32."""
    if intweight.shape[1] != zeros.shape[1]:
        raise ValueError(
            f"intweight has {intweight.shape[1]} output columns but zeros has {zeros.shape[1]}"
        )
    return pack_int4(intweight), pack_int4(zeros)


def unpack_awq(qweight: Tensor, qzeros: Tensor) -> tuple[Tensor, Tensor]:
    """``(qweight [K, N // 8], qzeros [K // G, N // 8])`` -> ``(intweight [K, N], zeros [K // G, N])``."""
    return unpack_int4(qweight), unpack_int4(qzeros)
