"""Hot-path kernels of the tpserve engine.

Each public function runs a Triton kernel on CUDA tensors and its plain-torch
twin from :mod:`tpserve.kernels.reference` elsewhere (set
``TPSERVE_FORCE_TRITON=1`` to force Triton, e.g. under ``TRITON_INTERPRET=1``).
"""

from . import gemv_rotary, int4_tinygemm
from .activation import silu_and_mul
from .attention import paged_attention
from .kv_cache import store_kv_cache
from .rmsnorm import fused_add_rms_norm, rms_norm
from .rotary import apply_rotary, build_cos_sin_cache, rotate_and_store
from .w4a16 import awq_dequantize, w4a16_gemm

__all__ = [
    "apply_rotary",
    "awq_dequantize",
    "build_cos_sin_cache",
    "fused_add_rms_norm",
    "gemv_rotary",
    "int4_tinygemm",
    "paged_attention",
    "rms_norm",
    "rotate_and_store",
    "silu_and_mul",
    "store_kv_cache",
    "w4a16_gemm",
]
