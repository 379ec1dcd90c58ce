"""The decoder shared by every supported family (they differ only in the
options ModelConfig records: biases, q/k norm, rope scaling, tied embeddings).

Module and buffer names equal the per-rank workspace tensor names, so loading
a rank is `load_state_dict`. Hot paths call `tpserve.kernels`, which runs
Triton on CUDA and plain torch elsewhere.
"""
from __future__ import annotations

import torch
from torch import nn

from ...kernels import (build_cos_sin_cache, gemv_rotary, paged_attention, rms_norm,
                        rotate_and_store)
from ...parallel.comm import LocalGroup, TPGroup
from ...parallel.linear import (LinearMethod, ParallelLinear, ParallelLMHead, PartialSums,
                                VocabParallelEmbedding)
from ...parallel.sharding import ShardPlan
from ..config import ModelConfig
from ..forward_batch import ForwardBatch
from ..kv_cache import KVCache, LayerKV
from .rope import rope_inv_freq


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(size, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, plan: ShardPlan, method: LinearMethod,
                 dtype: torch.dtype, group: TPGroup) -> None:
        super().__init__()
        self.num_heads = plan.heads_per_rank
        self.num_kv_heads = plan.kv_heads_per_rank
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim ** -0.5
        self.sliding_window = cfg.sliding_window
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = ParallelLinear(cfg.hidden_size, q + 2 * kv, cfg.qkv_bias, method, dtype)
        self.o_proj = ParallelLinear(q, cfg.hidden_size, cfg.o_bias, method, dtype, reduce=group)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype)
        self.split = (q, kv, kv)

    def project(self, x: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
                cos_sin: torch.Tensor, kv: LayerKV) -> torch.Tensor:
        """The rotated queries [t, heads, head_dim]; the tokens' keys and values go to
        the cache (padding tokens, slot -1, write nothing)."""
        t = x.shape[0]
        w = None if hasattr(self, "q_norm") else self.qkv_proj.one_row_weight(x)
        if w is not None and gemv_rotary.supports(x, kv.k):  # one kernel for all of it
            return gemv_rotary.qkv_rotate_and_store(
                x.reshape(1, -1), w, self.qkv_proj.bias, self.num_heads, self.num_kv_heads,
                positions, cos_sin, kv.k, kv.v, slot_mapping)
        q, k, v = self.qkv_proj(x).split(self.split, dim=-1)
        q = q.reshape(t, self.num_heads, self.head_dim)
        k = k.reshape(t, self.num_kv_heads, self.head_dim)
        v = v.reshape(t, self.num_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q = self.q_norm(q.reshape(-1, self.head_dim)).reshape(q.shape)
            k = self.k_norm(k.reshape(-1, self.head_dim)).reshape(k.shape)
        return rotate_and_store(q, k, v, positions, cos_sin, kv.k, kv.v, slot_mapping,
                                kv.k_scales, kv.v_scales, kv.static_params)

    def attend(self, q: torch.Tensor, batch: ForwardBatch, kv: LayerKV) -> torch.Tensor:
        """[t, heads * head_dim]: each request's queries over its cached context."""
        out = paged_attention(q, kv.k, kv.v, batch.block_tables, batch.seq_lens,
                              batch.query_start_loc, batch.max_query_len, batch.max_seq_len,
                              self.scale, self.sliding_window, kv.k_scales, kv.v_scales,
                              kv.static_params, batch.num_decodes, kv.arrivals)
        return out.reshape(q.shape[0], -1)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, plan: ShardPlan, method: LinearMethod,
                 dtype: torch.dtype, group: TPGroup) -> None:
        super().__init__()
        inter = plan.inter_per_rank
        self.gate_up_proj = ParallelLinear(cfg.hidden_size, 2 * inter, False, method, dtype)
        self.down_proj = ParallelLinear(inter, cfg.hidden_size, False, method, dtype, reduce=group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's partial sums of the output (see DecoderLayer.pre_attention)."""
        return self.down_proj.partial(self.gate_up_proj.silu_mul(x), half=1)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, plan: ShardPlan, method: LinearMethod,
                 dtype: torch.dtype, group: TPGroup) -> None:
        super().__init__()
        self.group = group
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = Attention(cfg, plan, method, dtype, group)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = MLP(cfg, plan, method, dtype, group)

    def pre_attention(self, x, residual, positions, slot_mapping, cos_sin, kv):
        """(queries, residual): the input norm and the q/k/v projection, K and V cached.
        x is the embedding's partial sums (residual None) or the previous layer's MLP's."""
        x, residual = reduce_add_norm(self.group, x, residual, self.input_layernorm)
        return self.self_attn.project(x, positions, slot_mapping, cos_sin, kv), residual

    def post_attention(self, attn, residual):
        """(MLP partial sums, residual): the output projection, the second norm, the MLP."""
        x, residual = reduce_add_norm(self.group, self.self_attn.o_proj.partial(attn, half=0),
                                      residual, self.post_attention_layernorm)
        return self.mlp(x), residual


def reduce_add_norm(group: TPGroup, partial: PartialSums, residual, norm: RMSNorm):
    """A row-parallel layer's all-reduce with the bias add, residual add (none for the
    embedding) and norm after it. The calls of a forward alternate the all-reduce
    buffer halves: 1 for the embedding, 0 after attention, 1 after the MLP, and 0 for
    the logits' gather (`compute_logits`), so the next forward's embedding takes 1.
    So every forward must end with `compute_logits`, of no rows if it wants none
    (which meets the ranks instead, see parallel/comm.py)."""
    return group.all_reduce_add_rms_norm(partial.sums, residual, norm.weight, norm.eps,
                                         partial.bias, partial.half, partial.sent)


class DecoderModel(nn.Module):
    """One rank of a decoder-only transformer."""

    def __init__(self, cfg: ModelConfig, plan: ShardPlan, method: LinearMethod,
                 padded_vocab: int, dtype: torch.dtype, group: TPGroup = LocalGroup(),
                 max_positions: int | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.group = group
        self.embed_tokens = VocabParallelEmbedding(padded_vocab, cfg.hidden_size, dtype, group)
        self.layers = nn.ModuleList(DecoderLayer(cfg, plan, method, dtype, group)
                                    for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.lm_head = ParallelLMHead(padded_vocab, cfg.hidden_size, cfg.vocab_size, dtype, group,
                                      own_weight=not cfg.tie_word_embeddings)
        inv_freq, scaling = rope_inv_freq(cfg)
        positions = max(max_positions or 0, cfg.max_position_embeddings)
        self.register_buffer("cos_sin", build_cos_sin_cache(inv_freq, positions, scaling),
                             persistent=False)

    @property
    def num_pieces(self) -> int:
        return len(self.layers) + 1

    def piece(self, i: int, x: torch.Tensor, residual: torch.Tensor | None,
              positions: torch.Tensor, slot_mapping: torch.Tensor, kv_cache: KVCache):
        """Piece i of a forward cut at its attention calls, the only work that depends on
        how the tokens split into requests (CUDA graphs capture the pieces of a step
        that is not a pure decode; attention runs between them).

        Piece 0 takes the input ids as x; piece i in 1..L takes layer i-1's attention
        output and that layer's residual. Pieces 0..L-1 return (queries of layer i,
        residual) with layer i's K/V cached; piece L returns (final hidden states, None).
        """
        if i == 0:
            x = self.embed_tokens.partial(x, half=1)
        else:
            x, residual = self.layers[i - 1].post_attention(x, residual)
        if i == len(self.layers):
            return reduce_add_norm(self.group, x, residual, self.norm)[0], None
        return self.layers[i].pre_attention(x, residual, positions, slot_mapping, self.cos_sin,
                                            kv_cache.layer(i))

    def attend(self, i: int, q: torch.Tensor, batch: ForwardBatch,
               kv_cache: KVCache) -> torch.Tensor:
        """Layer i's attention: [t, heads * head_dim]."""
        return self.layers[i].self_attn.attend(q, batch, kv_cache.layer(i))

    def forward(self, batch: ForwardBatch, kv_cache: KVCache) -> torch.Tensor:
        x, residual = batch.input_ids, None
        for i in range(len(self.layers)):
            q, residual = self.piece(i, x, residual, batch.positions, batch.slot_mapping,
                                     kv_cache)
            x = self.attend(i, q, batch, kv_cache)
        return self.piece(len(self.layers), x, residual, batch.positions, batch.slot_mapping,
                          kv_cache)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[S, hidden] -> [S, vocab_size] float32, whole vocab on every rank."""
        tied = self.embed_tokens.weight if self.config.tie_word_embeddings else None
        return self.lm_head(hidden, tied, half=0)
