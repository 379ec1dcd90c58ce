"""Plain-torch twins of every tpserve kernel.

Each function has the signature of its Triton counterpart and is what runs on
CPU. They favour clarity over speed; the kernel tests compare against them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Nibble i of a packed AutoAWQ "GEMM" int32 holds output column c*8 + AWQ_ORDER[i].
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * h.to(x.dtype)).to(x.dtype)


def fused_add_rms_norm(x, residual, weight, eps):
    new_residual = (x + residual).to(x.dtype)
    return rms_norm(new_residual, weight, eps), new_residual


def vocab_embedding(ids: torch.Tensor, weight: torch.Tensor, first: int = 0) -> torch.Tensor:
    local = ids - first
    outside = (local < 0) | (local >= weight.shape[0])
    out = torch.nn.functional.embedding(local.masked_fill(outside, 0), weight)
    return out.masked_fill(outside.unsqueeze(-1), 0)


def build_cos_sin_cache(inv_freq: torch.Tensor, max_pos: int,
                        attention_scaling: float = 1.0) -> torch.Tensor:
    """[max_pos, d] float32: cos in the first half, sin in the second."""
    t = torch.arange(max_pos, dtype=torch.float32, device=inv_freq.device)
    freqs = torch.outer(t, inv_freq.float())
    return torch.cat([freqs.cos() * attention_scaling,
                      freqs.sin() * attention_scaling], dim=-1).contiguous()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.to(x.dtype)


def apply_rotary(q, k, positions, cos_sin_cache):
    half = cos_sin_cache.shape[-1] // 2
    cs = cos_sin_cache[positions.long()]
    cos, sin = cs[:, None, :half], cs[:, None, half:]
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    inter = x.shape[-1] // 2
    xf = x.float()
    return (F.silu(xf[..., :inter]) * xf[..., inter:]).to(x.dtype)


def quantize_per_token(x: torch.Tensor, scale_dtype: torch.dtype):
    """Online asymmetric int8: per row of the last dim, returns (q, scale, zp)."""
    xf = x.float()
    hi, lo = xf.amax(-1), xf.amin(-1)
    scale = ((hi - lo) / 255.0).to(scale_dtype).float()
    zp = ((hi + lo) / 2.0).to(scale_dtype).float()
    return quantize_with(xf, scale, zp), scale, zp


def quantize_with(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
    """q = round((x - zp) / scale) in [-128, 127]; a zero scale gives q = 0."""
    scale, zp = scale.unsqueeze(-1), zp.unsqueeze(-1)
    inv = torch.where(scale > 0, 1.0 / torch.where(scale > 0, scale, 1.0), 0.0)
    q = torch.floor((x.float() - zp) * inv + 0.5)
    return q.clamp(-128, 127).to(torch.int8)


def one_pair(scales: torch.Tensor) -> bool:
    """True for per-token scales that are a broadcast view of a single (scale, zero
    point) pair (`kv_cache.calibrated_scales`): there is nothing per token to write."""
    return all(st == 0 for st in scales.stride()[:-1])


def _store_one(x, cache, scales, slots, static):
    nb, bs = cache.shape[:2]
    flat = cache.view(nb * bs, *cache.shape[2:])
    if cache.dtype != torch.int8:
        flat[slots] = x.to(cache.dtype)
        return
    if static is None:
        q, scale, zp = quantize_per_token(x, scales.dtype)
    else:
        shape = x.shape[:-1]
        scale = torch.full(shape, static[0], device=x.device).to(scales.dtype).float()
        zp = torch.full(shape, static[1], device=x.device).to(scales.dtype).float()
        q = quantize_with(x, scale, zp)
    flat[slots] = q
    if one_pair(scales):
        return  # the calibrated pair itself, nothing per token (kv_cache.store_kv_cache checks)
    # indexed by (block, offset): the scales may be laid out head-major within a block
    scales[slots // bs, slots % bs] = torch.stack([scale, zp], -1).to(scales.dtype)


def store_kv_cache(k, v, k_cache, v_cache, slot_mapping, k_scales=None,
                   v_scales=None, static_params=None) -> None:
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_static = None if static_params is None else static_params[0:2]
    v_static = None if static_params is None else static_params[2:4]
    _store_one(k[keep], k_cache, k_scales, slots, k_static)
    _store_one(v[keep], v_cache, v_scales, slots, v_static)


def gather_kv(cache, scales, block_table, seq_len: int) -> torch.Tensor:
    """[seq_len, nkv, d] float32 keys or values of one request, dequantized."""
    bs = cache.shape[1]
    pos = torch.arange(seq_len, device=cache.device)
    blocks = block_table[pos // bs].long()
    x = cache[blocks, pos % bs].float()
    if cache.dtype == torch.int8:
        s = scales[blocks, pos % bs].float()
        x = x * s[..., 0:1] + s[..., 1:2]
    return x


def paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                    max_query_len, max_seq_len, scale, sliding_window=None,
                    k_scales=None, v_scales=None) -> torch.Tensor:
    out = torch.empty_like(q)
    nq, nkv = q.shape[1], k_cache.shape[2]
    for b in range(seq_lens.shape[0]):
        start, end = int(query_start_loc[b]), int(query_start_loc[b + 1])
        seq_len = int(seq_lens[b])
        k = gather_kv(k_cache, k_scales, block_tables[b], seq_len)
        v = gather_kv(v_cache, v_scales, block_tables[b], seq_len)
        k = k.repeat_interleave(nq // nkv, dim=1)
        v = v.repeat_interleave(nq // nkv, dim=1)
        qpos = torch.arange(seq_len - (end - start), seq_len, device=q.device)
        kpos = torch.arange(seq_len, device=q.device)
        mask = kpos[None, :] <= qpos[:, None]
        if sliding_window is not None:
            mask &= kpos[None, :] > qpos[:, None] - sliding_window
        s = torch.einsum("qhd,khd->hqk", q[start:end].float(), k) * scale
        p = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1)
        out[start:end] = torch.einsum("hqk,khd->qhd", p, v).to(q.dtype)
    return out


def decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale, sliding_window=None,
                     k_scales=None, v_scales=None) -> torch.Tensor:
    """paged_attention for one query token per request, all requests at once: each
    request's cache pages are gathered into a [B, L, nkv, d] tensor (L: the longest
    context, rounded up to whole pages) and masked past its own length; then one
    batched matmul pair per kv head, which reads that head's strided slice in place.
    This is the CPU path of decode steps; the per-request loop above costs a Python
    iteration per request and layer."""
    b, nq, d = q.shape
    page, nkv = k_cache.shape[1], k_cache.shape[2]
    if b == 0:
        return torch.empty_like(q)
    pages = -(-int(seq_lens.max()) // page)
    tables = block_tables[:, :pages].long()

    def gather(cache, scales):
        x = cache[tables].float()  # [B, pages, page, nkv, d]
        if cache.dtype == torch.int8:
            sc = scales[tables].float()
            x = x * sc[..., 0:1] + sc[..., 1:2]
        return x.reshape(b, pages * page, nkv, d)

    k, v = gather(k_cache, k_scales), gather(v_cache, v_scales)
    kpos = torch.arange(pages * page, device=q.device)
    lens = seq_lens.long()[:, None]
    visible = kpos[None, :] < lens
    if sliding_window is not None:  # the query sits at position len - 1
        visible &= kpos[None, :] > lens - 1 - sliding_window
    hidden = ~visible[:, None, :]
    qg = q.float().reshape(b, nkv, nq // nkv, d)
    out = torch.empty(b, nkv, nq // nkv, d, device=q.device)
    for h in range(nkv):
        s = torch.bmm(qg[:, h], k[:, :, h].transpose(1, 2)) * scale
        p = torch.softmax(s.masked_fill_(hidden, float("-inf")), dim=-1)
        out[:, h] = torch.bmm(p.nan_to_num_(0.0), v[:, :, h])  # no context: zeros
    return out.reshape(b, nq, d).to(q.dtype)


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """[R, C] int32 in AutoAWQ GEMM order -> [R, C*8] int32 nibbles 0..15."""
    shifts = torch.arange(8, device=packed.device, dtype=torch.int32) * 4
    nibbles = (packed.unsqueeze(-1) >> shifts) & 0xF
    out = torch.empty_like(nibbles)
    out[..., list(AWQ_ORDER)] = nibbles
    return out.reshape(packed.shape[0], -1)


def awq_dequantize(qweight, scales, qzeros, group_size: int) -> torch.Tensor:
    """[K, N] weights w = (q - z) * s, in the scales' dtype."""
    q = unpack_awq(qweight).float()
    z = unpack_awq(qzeros).float().repeat_interleave(group_size, dim=0)
    s = scales.float().repeat_interleave(group_size, dim=0)
    return ((q - z) * s).to(scales.dtype)


def w4a16_gemm(x, qweight, scales, qzeros, group_size: int) -> torch.Tensor:
    w = awq_dequantize(qweight, scales, qzeros, group_size)
    return (x.float() @ w.float()).to(x.dtype)
