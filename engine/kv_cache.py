"""The paged KV cache of one rank: one tensor for keys and one for values,
[layers, blocks, block_size, kv_heads, head_dim], in the compute dtype or
int8 with a (scale, zero) pair per token and head, or, with calibrated parameters,
one pair per layer for keys and one for values (no memory per token)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.attention_decode import arrival_counters
from ..kernels.kv_cache import calibrated_scales, int8_scales


@dataclass
class LayerKV:
    k: torch.Tensor
    v: torch.Tensor
    k_scales: torch.Tensor | None = None
    v_scales: torch.Tensor | None = None
    static_params: tuple[float, float, float, float] | None = None
    arrivals: torch.Tensor | None = None


@dataclass
class KVCache:
    k: torch.Tensor
    v: torch.Tensor
    k_scales: torch.Tensor | None = None
    v_scales: torch.Tensor | None = None
    # calibrated (k_scale, k_zp, v_scale, v_zp) per layer for this rank, from `lite kv_qparams`
    static_params: list[tuple[float, float, float, float]] | None = None
    # decode attention's counters (kernels/attention_decode.py), shared by the layers
    arrivals: torch.Tensor | None = None

    # decode tokens a step the counters serve; a larger batch merges in a second kernel
    MAX_DECODE_TOKENS = 4096

    @classmethod
    def allocate(cls, num_layers: int, num_blocks: int, block_size: int, kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device, int8: bool = False,
                 static_params: list[tuple[float, float, float, float]] | None = None) -> "KVCache":
        shape = (num_layers, num_blocks, block_size, kv_heads, head_dim)
        arrivals = arrival_counters(min(num_blocks, cls.MAX_DECODE_TOKENS), kv_heads, device)
        if not int8:
            return cls(torch.zeros(shape, dtype=dtype, device=device),
                       torch.zeros(shape, dtype=dtype, device=device), arrivals=arrivals)
        k, v = (torch.zeros(shape, dtype=torch.int8, device=device) for _ in range(2))
        if static_params is None:
            return cls(k, v, int8_scales(shape, device), int8_scales(shape, device),
                       arrivals=arrivals)
        return cls(k, v, *calibrated_scales(static_params, shape, device), static_params,
                   arrivals)

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, kv_heads: int, head_dim: int,
                        dtype: torch.dtype, int8: bool = False,
                        per_token_scales: bool = True) -> int:
        """Bytes of one block over all layers, keys and values; an int8 cache with
        per-token scales adds a float32 (scale, zero point) per token and head."""
        per_token_head = head_dim * (1 if int8 else torch.finfo(dtype).bits // 8)
        if int8 and per_token_scales:
            per_token_head += 2 * 4
        return 2 * num_layers * block_size * kv_heads * per_token_head

    def layer(self, i: int) -> LayerKV:
        return LayerKV(self.k[i], self.v[i],
                       None if self.k_scales is None else self.k_scales[i],
                       None if self.v_scales is None else self.v_scales[i],
                       None if self.static_params is None else self.static_params[i],
                       self.arrivals)
