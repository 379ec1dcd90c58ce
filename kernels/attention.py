"""Paged attention over the KV cache: decode and prefill paths behind one call.

Request b's queries are rows ``[query_start_loc[b], query_start_loc[b+1])`` of q;
its keys/values (already stored, new tokens included) are reached through
``block_tables[b]``. Query head h reads kv head ``h // (nq // nkv)``.
"""

from __future__ import annotations

import torch

from . import reference
from ._dispatch import use_triton
from .attention_decode import decode_attention
from .attention_prefill import prefill_attention


def _check(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, k_scales):
    num_q, num_kv = q.shape[1], k_cache.shape[2]
    if num_kv == 0 or num_q % num_kv:
        raise ValueError(f"paged_attention: {num_q} query heads is not a multiple of "
                         f"{num_kv} kv heads")
    if k_cache.shape != v_cache.shape or k_cache.shape[3] != q.shape[2]:
        raise ValueError(f"paged_attention: cache shapes {tuple(k_cache.shape)} / "
                         f"{tuple(v_cache.shape)} do not fit q {tuple(q.shape)}")
    if k_cache.stride() != v_cache.stride():
        raise ValueError("paged_attention: k_cache and v_cache must share a layout")
    batch = seq_lens.shape[0]
    if query_start_loc.shape[0] != batch + 1 or block_tables.shape[0] < batch:
        raise ValueError("paged_attention: query_start_loc must have len(seq_lens) + 1 "
                         "entries and block_tables one row per request")
    if k_cache.dtype == torch.int8 and k_scales is None:
        raise ValueError("paged_attention: an int8 cache needs k_scales and v_scales")


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, seq_lens: torch.Tensor,
                    query_start_loc: torch.Tensor, max_query_len: int, max_seq_len: int,
                    scale: float, sliding_window: int | None = None,
                    k_scales: torch.Tensor | None = None,
                    v_scales: torch.Tensor | None = None,
                    static_params: tuple[float, float, float, float] | None = None,
                    num_decodes: int = 0,
                    arrivals: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of q [T, nq, d] over the paged cache; returns [T, nq, d].

    ``static_params``: the calibrated (k_scale, k_zp, v_scale, v_zp) every token of an
    int8 cache was written with (`store_kv_cache`); decode then skips the per-token
    scales. The per-token scales must hold the same values (`kv_cache.calibrated_scales`
    is a view of the one pair).

    ``num_decodes``: how many requests from the first have one query token each. A
    batch that mixes them with prompt chunks runs them through the decode kernel,
    which reads the cache faster than the prefill kernel does.

    ``arrivals``: `attention_decode.arrival_counters` for at least the decode tokens,
    so that decode merges its splits without a second kernel."""
    _check(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, k_scales)
    decode = max_query_len == 1 and q.shape[0] == seq_lens.shape[0]
    if not use_triton(q):
        if decode:
            return reference.decode_attention(q, k_cache, v_cache, block_tables, seq_lens,
                                              scale, sliding_window, k_scales, v_scales)
        return reference.paged_attention(q, k_cache, v_cache, block_tables, seq_lens,
                                         query_start_loc, max_query_len, max_seq_len, scale,
                                         sliding_window, k_scales, v_scales)
    if q.stride(-1) != 1:
        q = q.contiguous()
    if q.shape[0] == 0:
        return torch.empty_like(q)
    if decode:
        return decode_attention(q, k_cache, v_cache, block_tables, seq_lens, max_seq_len,
                                scale, sliding_window, k_scales, v_scales, static_params,
                                arrivals=arrivals)
    if 0 < num_decodes < seq_lens.shape[0]:
        d = num_decodes
        out = torch.empty_like(q)
        out[:d] = decode_attention(q[:d], k_cache, v_cache, block_tables[:d], seq_lens[:d],
                                   max_seq_len, scale, sliding_window, k_scales, v_scales,
                                   static_params, arrivals=arrivals)
        out[d:] = prefill_attention(q[d:], k_cache, v_cache, block_tables[d:], seq_lens[d:],
                                    query_start_loc[d:] - d, max_query_len, scale,
                                    sliding_window, k_scales, v_scales)
        return out
    return prefill_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                             max_query_len, scale, sliding_window, k_scales, v_scales)
