"""Linear layers for tensor parallelism, and the weight formats they run.

A `LinearMethod` owns a weight layout: which tensors a linear layer holds,
how to cut them along the output or the input features (the tensor-parallel
split, done once at convert time), how to fuse several layers on the output
dim (q/k/v, gate/up) and how to run them. Tensor-parallel code calls those
methods and never looks inside the packing.
"""
from __future__ import annotations

import logging
from typing import NamedTuple, Protocol

import torch
from torch import nn

from ..kernels import int4_tinygemm, silu_and_mul, w4a16_gemm
from ..kernels.embedding import vocab_embedding
from ..kernels.gemv import linear, linear_silu_mul, one_row
from ..kernels.peer_slots import SendTarget
from .comm import LocalGroup, TPGroup

logger = logging.getLogger(__name__)

Params = dict[str, torch.Tensor]


class LinearMethod(Protocol):
    name: str

    def shapes(self, in_features: int, out_features: int, dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]: ...
    def slice_out(self, p: Params, start: int, end: int) -> Params: ...
    def slice_in(self, p: Params, start: int, end: int) -> Params: ...
    def cat_out(self, parts: list[Params]) -> Params: ...
    def apply(self, p: Params, x: torch.Tensor) -> torch.Tensor: ...
    def apply_silu_mul(self, p: Params, x: torch.Tensor) -> torch.Tensor:
        """silu(g) * u for [g | u] = apply(p, x): a SwiGLU [gate | up] layer."""
    def apply_sending(self, p: Params, x: torch.Tensor, send: SendTarget) -> torch.Tensor | None:
        """apply(p, x), the kernel also writing its output row into the other ranks'
        all-reduce slots (kernels/peer_slots.py); None, having done nothing, where
        the format's kernel for x cannot."""
    def one_row_weight(self, p: Params, x: torch.Tensor) -> torch.Tensor | None:
        """The dense weight [out, in] where x is one row that the Triton GEMV takes
        (kernels/gemv.py), for kernels that fold more work into that GEMV; else None."""
    def finalize(self, layer: "ParallelLinear") -> None:
        """Once the layer's weights are loaded: any repacking for the device's kernels."""


class UnquantizedMethod:
    """weight [out, in] in the compute dtype."""

    name = "none"
    param_names = ("weight",)

    def shapes(self, in_features, out_features, dtype):
        return {"weight": ((out_features, in_features), dtype)}

    def slice_out(self, p, start, end):
        return {"weight": p["weight"][start:end]}

    def slice_in(self, p, start, end):
        return {"weight": p["weight"][:, start:end]}

    def cat_out(self, parts):
        return {"weight": torch.cat([q["weight"] for q in parts], dim=0)}

    def apply(self, p, x):
        return linear(x, p["weight"])

    def apply_silu_mul(self, p, x):
        return linear_silu_mul(x, p["weight"])

    def apply_sending(self, p, x, send):
        return linear(x, p["weight"], send) if one_row(x, p["weight"]) else None

    def one_row_weight(self, p, x):
        return p["weight"] if one_row(x, p["weight"]) else None

    def finalize(self, layer: "ParallelLinear") -> None:
        pass


class AWQMethod:
    """4-bit weights in AutoAWQ's GEMM packing: qweight [in, out/8] int32,
    qzeros [in/G, out/8] int32, scales [in/G, out]. Cuts fall on packed words
    (8 output columns) and on quantization groups (G input rows)."""

    name = "awq"
    param_names = ("qweight", "qzeros", "scales")

    def __init__(self, group_size: int) -> None:
        self.group_size = group_size
        self._int4_failed = False  # PyTorch's int4 matmul failed once: do not try again

    def shapes(self, in_features, out_features, dtype):
        g = self.group_size
        return {"qweight": ((in_features, out_features // 8), torch.int32),
                "qzeros": ((in_features // g, out_features // 8), torch.int32),
                "scales": ((in_features // g, out_features), dtype)}

    def slice_out(self, p, start, end):
        if start % 8 or end % 8:
            raise ValueError(f"AWQ weights can only be split on output columns that are multiples "
                             f"of 8; got [{start}, {end})")
        return {"qweight": p["qweight"][:, start // 8:end // 8],
                "qzeros": p["qzeros"][:, start // 8:end // 8],
                "scales": p["scales"][:, start:end]}

    def slice_in(self, p, start, end):
        g = self.group_size
        if start % g or end % g:
            raise ValueError(f"AWQ weights can only be split on input rows that are multiples of "
                             f"the group size {g}; got [{start}, {end})")
        return {"qweight": p["qweight"][start:end],
                "qzeros": p["qzeros"][start // g:end // g],
                "scales": p["scales"][start // g:end // g]}

    def cat_out(self, parts):
        return {k: torch.cat([q[k] for q in parts], dim=1) for k in self.param_names}

    def apply(self, p, x):
        # w4a16_gemm picks the kernel by device and rows (on CPU: dequantized, plain torch)
        return w4a16_gemm(x, p["qweight"], p["scales"], p["qzeros"], self.group_size)

    def apply_silu_mul(self, p, x):
        return silu_and_mul(self.apply(p, x))

    def apply_sending(self, p, x, send):
        return None

    def one_row_weight(self, p, x):
        return None

    def finalize(self, layer: "ParallelLinear") -> None:
        """After loading, where PyTorch's int4 matmul runs (bf16 on CUDA): adds a copy of
        the weights packed for it, used for up to TINYGEMM_MAX_M rows."""
        if not self._int4_failed and int4_tinygemm.supports(
                layer.scales.dtype, layer.scales.device, layer.qweight.shape[0], self.group_size):
            try:
                packed, scales_and_zeros = int4_tinygemm.pack(layer.qweight, layer.scales,
                                                              layer.qzeros)
            except RuntimeError as exc:  # a torch build without the CUDA kernels
                self._int4_failed = True
                logger.warning("PyTorch's int4 matmul is unavailable (%s); 4-bit layers use "
                               "the Triton kernel", str(exc).splitlines()[0])
                return
            layer.register_buffer("int4pack", packed)
            layer.register_buffer("scales_and_zeros", scales_and_zeros)
            layer.method = AWQTinyGemmMethod(self.group_size)


class AWQTinyGemmMethod(AWQMethod):
    """AWQ weights plus the copy `AWQMethod.finalize` packs for PyTorch's int4 matmul
    (kernels/int4_tinygemm.py). On one H200 that matmul is 1.6-1.9x faster than bf16
    cuBLAS for 1-2 rows, 1.2-1.3x for 4, and far slower from 16 rows on, where the
    Triton kernel on the AutoAWQ layout is used. The copy costs 0.5 byte a weight."""

    param_names = AWQMethod.param_names + ("int4pack", "scales_and_zeros")

    def apply(self, p, x):
        shape = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if x2.shape[0] > TINYGEMM_MAX_M:
            return super().apply(p, x)
        y = int4_tinygemm.int4_mm(x2.contiguous(), p["int4pack"], p["scales_and_zeros"],
                                  self.group_size)
        return y.reshape(*shape, y.shape[-1])

    def finalize(self, layer: "ParallelLinear") -> None:
        pass


TINYGEMM_MAX_M = 4


def linear_method(quant_method: str, group_size: int = 0) -> LinearMethod:
    if quant_method == "awq":
        return AWQMethod(group_size)
    return UnquantizedMethod()


class PartialSums(NamedTuple):
    """A row-parallel layer's output before its all-reduce (`ParallelLinear.partial`):
    this rank's sums, the bias to add once after the sum, the all-reduce buffer half
    (parallel/symm_all_reduce.py), and whether the sums are in the peers' slots
    already. `TPGroup.all_reduce_add_rms_norm` finishes it, given all four."""
    sums: torch.Tensor
    bias: torch.Tensor | None
    half: int
    sent: bool


class ParallelLinear(nn.Module):
    """A linear layer holding this rank's shard.

    Column-parallel layers (reduce=None) produce this rank's slice of the
    outputs; row-parallel ones (reduce=group) take this rank's slice of the
    inputs and all-reduce the partial sums, adding the bias once, afterwards.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, method: LinearMethod,
                 dtype: torch.dtype, reduce: TPGroup | None = None) -> None:
        super().__init__()
        self.method = method
        self.reduce = reduce
        self.out_features = out_features
        for name, (shape, dt) in method.shapes(in_features, out_features, dtype).items():
            self.register_buffer(name, torch.empty(shape, dtype=dt))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype) if bias else None)

    def finalize(self) -> None:
        """Called once the weights are loaded (see LinearMethod.finalize)."""
        self.method.finalize(self)

    def params(self) -> Params:
        return {name: getattr(self, name) for name in self.method.param_names}

    def silu_mul(self, x: torch.Tensor) -> torch.Tensor:
        """silu(g) * u of this column-parallel [gate | up] layer's output [g | u]
        (no bias): one kernel for both where the weight format has one."""
        if self.bias is not None or self.reduce is not None:
            raise ValueError("silu_mul is for a column-parallel [gate | up] layer without bias")
        return self.method.apply_silu_mul(self.params(), x)

    def one_row_weight(self, x: torch.Tensor) -> torch.Tensor | None:
        """This column-parallel layer's dense weight where x is one row the Triton GEMV
        takes (LinearMethod.one_row_weight), for a kernel that folds more work into it."""
        return None if self.reduce is not None else self.method.one_row_weight(self.params(), x)

    def partial(self, x: torch.Tensor, half: int) -> PartialSums:
        """A row-parallel layer's output before the all-reduce, for the all-reduce
        buffer half `half` (the caller finishes it with `group.all_reduce_add_rms_norm`).
        Where the group and the kernel can, the kernel sends the sums to the other
        ranks itself, so that the all-reduce only waits for theirs."""
        p = self.params()
        send = self.reduce.send_target(x.shape[:-1].numel(), self.out_features, x.dtype,
                                       half) if self.reduce is not None else None
        y = self.method.apply_sending(p, x, send) if send is not None else None
        sent = y is not None
        if not sent:
            y = self.method.apply(p, x)
        return PartialSums(y, self.bias, half, sent)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.method.apply(self.params(), x)
        if self.reduce is not None and self.reduce.world_size > 1:
            y = self.reduce.all_reduce(y)
        if self.bias is not None:
            y = y + self.bias
        return y


class VocabParallelEmbedding(nn.Module):
    """Rows [rank * V/tp, (rank+1) * V/tp) of the (padded) embedding table."""

    def __init__(self, padded_vocab: int, hidden: int, dtype: torch.dtype,
                 group: TPGroup = LocalGroup()) -> None:
        super().__init__()
        self.group = group
        self.per_rank = padded_vocab // group.world_size
        self.start = group.rank * self.per_rank
        self.register_buffer("weight", torch.empty(self.per_rank, hidden, dtype=dtype))

    def partial(self, ids: torch.Tensor, half: int) -> PartialSums:
        """The lookup before its all-reduce, as a row-parallel layer's `partial`: this
        rank's rows, zeros for the ids of other ranks, sent to them already where the
        group and the kernel can (one id on the one-shot path)."""
        if self.group.world_size == 1:
            return PartialSums(torch.nn.functional.embedding(ids, self.weight), None, half, False)
        send = self.group.send_target(ids.numel(), self.weight.shape[1], self.weight.dtype, half)
        rows = vocab_embedding(ids, self.weight, self.start, send)
        return PartialSums(rows, None, half, send is not None)


class ParallelLMHead(nn.Module):
    """This rank's vocab rows of the output projection; logits are gathered whole
    and trimmed to the real vocab."""

    def __init__(self, padded_vocab: int, hidden: int, vocab_size: int, dtype: torch.dtype,
                 group: TPGroup = LocalGroup(), own_weight: bool = True) -> None:
        super().__init__()
        self.group = group
        self.vocab_size = vocab_size
        shape = (padded_vocab // group.world_size, hidden)
        self.register_buffer("weight", torch.empty(shape, dtype=dtype) if own_weight else None)

    def forward(self, hidden: torch.Tensor, tied: torch.Tensor | None = None,
                half: int = 0) -> torch.Tensor:
        """[rows, vocab_size] float32 logits on every rank. tied: the embedding's shard,
        for models whose output reuses it. half: the all-reduce buffer half the gather
        may use (parallel/symm_all_reduce.py; the decoder's calls alternate halves)."""
        w = self.weight if tied is None else tied
        send = None
        if self.group.world_size > 1 and one_row(hidden, w):  # the GEMV sends its row
            send = self.group.send_target(1, w.shape[0], hidden.dtype, half)
        logits = linear(hidden, w, send)
        return self.group.all_gather_vocab(logits, self.vocab_size, half, send is not None)
