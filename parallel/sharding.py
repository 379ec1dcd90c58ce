"""The tensor-parallel split, done once when a model is converted.

Per rank: q/k/v fused on the output dim (`qkv_proj`) with this rank's heads,
gate/up fused (`gate_up_proj`) with this rank's slice of the MLP, `o_proj`
and `down_proj` cut on the input dim, the embedding and LM head cut on the
(padded) vocab, norms whole. When tp exceeds the KV heads, each KV head is
replicated on the ranks whose query heads use it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .linear import LinearMethod, Params


@dataclass(frozen=True)
class ShardPlan:
    """Which heads and MLP columns one rank holds."""

    tp: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int

    @property
    def heads_per_rank(self) -> int:
        return self.num_heads // self.tp

    @property
    def kv_heads_per_rank(self) -> int:
        return max(1, self.num_kv_heads // self.tp)

    @property
    def inter_per_rank(self) -> int:
        return self.intermediate_size // self.tp

    def kv_head_start(self, rank: int) -> int:
        if self.num_kv_heads >= self.tp:
            return rank * self.kv_heads_per_rank
        return rank * self.num_kv_heads // self.tp

    def problems(self, group_size: int = 0) -> list[str]:
        """Why this tp cannot split the model; empty when it can."""
        out = []
        if self.num_heads % self.tp:
            out.append(f"tp={self.tp} must divide the {self.num_heads} attention heads")
        kv, tp = self.num_kv_heads, self.tp
        if (kv >= tp and kv % tp) or (kv < tp and tp % kv):
            out.append(f"tp={tp} and the {kv} key/value heads must divide one another")
        if self.intermediate_size % self.tp:
            out.append(f"tp={tp} must divide the MLP width {self.intermediate_size}")
        elif group_size and self.inter_per_rank % group_size:
            out.append(f"with AWQ group size {group_size}, each rank's MLP slice "
                       f"({self.intermediate_size}/{tp} = {self.inter_per_rank}) must be a multiple "
                       f"of the group size; use tp={_largest_tp(self.intermediate_size, group_size)} "
                       f"or lower, or quantize with a smaller --w-group-size")
        return out


def _largest_tp(width: int, group: int) -> int:
    tp = 1
    while width % (tp * 2 * group) == 0:
        tp *= 2
    return tp


def shard_layer(tensors: dict[str, torch.Tensor], layer: int, plan: ShardPlan,
                method: LinearMethod, rank: int) -> dict[str, torch.Tensor]:
    """This rank's tensors of one decoder layer, from its canonical full tensors."""
    pre = f"layers.{layer}."
    hd = plan.head_dim
    q0 = rank * plan.heads_per_rank * hd
    q_range = (q0, q0 + plan.heads_per_rank * hd)
    k0 = plan.kv_head_start(rank) * hd
    kv_range = (k0, k0 + plan.kv_heads_per_rank * hd)
    i0 = rank * plan.inter_per_rank
    i_range = (i0, i0 + plan.inter_per_rank)

    def linear(name: str) -> Params:
        prefix = f"{pre}{name}."
        return {k[len(prefix):]: v for k, v in tensors.items()
                if k.startswith(prefix) and k[len(prefix):] != "bias"}

    def bias(name: str) -> torch.Tensor | None:
        return tensors.get(f"{pre}{name}.bias")

    out: dict[str, torch.Tensor] = {}
    q, k, v = (linear(f"self_attn.{n}_proj") for n in "qkv")
    qkv = method.cat_out([method.slice_out(q, *q_range), method.slice_out(k, *kv_range),
                          method.slice_out(v, *kv_range)])
    out.update({f"{pre}self_attn.qkv_proj.{n}": t for n, t in qkv.items()})
    if bias("self_attn.q_proj") is not None:
        out[f"{pre}self_attn.qkv_proj.bias"] = torch.cat([
            bias("self_attn.q_proj")[slice(*q_range)], bias("self_attn.k_proj")[slice(*kv_range)],
            bias("self_attn.v_proj")[slice(*kv_range)]])
    o = method.slice_in(linear("self_attn.o_proj"), *q_range)
    out.update({f"{pre}self_attn.o_proj.{n}": t for n, t in o.items()})
    gate_up = method.cat_out([method.slice_out(linear("mlp.gate_proj"), *i_range),
                              method.slice_out(linear("mlp.up_proj"), *i_range)])
    out.update({f"{pre}mlp.gate_up_proj.{n}": t for n, t in gate_up.items()})
    down = method.slice_in(linear("mlp.down_proj"), *i_range)
    out.update({f"{pre}mlp.down_proj.{n}": t for n, t in down.items()})
    for whole in ("self_attn.o_proj.bias", "mlp.down_proj.bias", "input_layernorm.weight",
                  "post_attention_layernorm.weight", "self_attn.q_norm.weight",
                  "self_attn.k_norm.weight"):
        if pre + whole in tensors:
            out[pre + whole] = tensors[pre + whole]
    return {name: t.contiguous() for name, t in out.items()}


def padded_vocab(vocab_size: int, tp: int, multiple: int = 64) -> int:
    """The vocab padded so every rank holds an equal, aligned slice."""
    step = multiple * tp
    return (vocab_size + step - 1) // step * step


def shard_vocab(weight: torch.Tensor, padded: int, tp: int, rank: int) -> torch.Tensor:
    """Rows [rank * padded/tp, (rank+1) * padded/tp) of an embedding-like table, zero-padded."""
    per = padded // tp
    out = weight.new_zeros(per, weight.shape[1])
    rows = weight[rank * per:(rank + 1) * per]
    out[:rows.shape[0]] = rows
    return out
