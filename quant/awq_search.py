"""AWQ numerics on plain tensors: the per-channel scale search and the clipping search.

A group of linears reading the same input ``x [tokens, C]`` (q/k/v, gate/up,
o, down) gets one scale per input channel ``s [C]``. The linears are
quantized as ``Q(W * s)`` and the op before them divided by ``s``, so the
block computes ``Q(W * s) (x / s)``. Candidates, as in AWQ::

    s = x_stat**r / (w_mean**(1 - r) + 1e-4),  clamped >= 1e-4,
    s = s / sqrt(max(s) * min(s))

``x_stat`` is the mean |x| per channel, ``w_mean`` the mean over output rows of
|W| normalised by its group's absmax. The search tries r in {0, 1/20, ...,
19/20} and keeps the r with the least mean squared error of the linears'
outputs; ``s = 1`` (plain round-to-nearest) is a candidate too, so the result
is never worse than RTN on the calibration tokens. The error is measured on a
block's output (``awq_blocks``: the attention block for q/k/v, the MLP for
gate/up), by default on the linears' own outputs. The fast mode of LMDeploy
0.1.0 is r = 0.5 with ``x_stat`` = absmax.
"""

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from tpserve.quant.awq_blocks import LinearsBlock
from tpserve.quant.quantize import fake_quantize

Block = Callable[[list[Tensor]], Tensor]  # candidate weights -> the block's output

SCALE_GRID = 20
FAST_RATIO = 0.5
CLIP_GRID = 20
CLIP_MAX_SHRINK = 0.5
CLIP_TOKENS = 512
CLIP_ROW_BATCH = 256


@dataclass(frozen=True)
class ScaleSearch:
    scales: Tensor  # [C] float32
    ratio: float  # chosen r; nan for the identity (RTN) candidate
    loss: float  # block-output MSE with the chosen scales
    rtn_loss: float  # block-output MSE of plain round-to-nearest


def weight_channel_mean(weight: Tensor, group_size: int) -> Tensor:
    """Mean over output rows of ``|W|`` normalised by each group's absmax: ``[out, C] -> [C]``."""
    w = weight.float().abs().reshape(-1, group_size)
    w = w / (w.amax(dim=1, keepdim=True) + 1e-6)
    return w.reshape(weight.shape).mean(0)


def awq_scales(x_stat: Tensor, w_mean: Tensor, ratio: float) -> Tensor:
    s = (x_stat.float().pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def scaled_output_loss(block: Block, weights: list[Tensor], ref: Tensor, s: Tensor, bits: int,
                       group_size: int) -> float:
    """MSE between the block's float output ``ref`` and its output with ``Q(W * s) / s``."""
    candidates = [fake_quantize(w * s, bits, group_size) / s for w in weights]
    return (block(candidates) - ref).pow(2).mean().item()


@torch.no_grad()
def find_scales(
    x: Tensor, x_stat: Tensor, weights: list[Tensor], bits: int, group_size: int, search: bool = True,
    block: Block | None = None,
) -> ScaleSearch:
    """Scales for the linears ``weights`` (each ``[out_i, C]``) reading ``x [tokens, C]``.

    ``block`` gives the output the loss is measured on (default: the linears' own
    outputs for ``x``). ``search=False`` is the fast mode: no search, r = 0.5
    (``x_stat`` is then the absmax).
    """
    weights = [w.float() for w in weights]
    block = block or LinearsBlock(x)
    ref = block(weights)
    w_mean = weight_channel_mean(torch.cat(weights), group_size)
    ones = torch.ones(weights[0].shape[1], device=weights[0].device)
    rtn = scaled_output_loss(block, weights, ref, ones, bits, group_size)
    ratios = [i / SCALE_GRID for i in range(SCALE_GRID)] if search else [FAST_RATIO]
    best = ScaleSearch(ones, math.nan, rtn, rtn) if search else None
    for r in ratios:
        s = awq_scales(x_stat.to(w_mean.device), w_mean, r)
        loss = scaled_output_loss(block, weights, ref, s, bits, group_size)
        if best is None or loss < best.loss:
            best = ScaleSearch(s, r, loss, rtn)
    return best


@torch.no_grad()
def find_clip(weight: Tensor, x: Tensor, bits: int, group_size: int) -> Tensor:
    """Per-group clip bound ``[out, C // G]`` minimising each group's share of the output error.

    Bounds are ``absmax * (1 - i / 20)`` for i < 10, as in AWQ; weights are
    then clamped to ``[-bound, bound]`` before quantization.
    """
    w = weight.float()
    out_dim, in_dim = w.shape
    n_groups = in_dim // group_size
    step = max(1, x.shape[0] // CLIP_TOKENS)
    xg = x.float()[::step][:CLIP_TOKENS].reshape(-1, n_groups, group_size)
    bounds = []
    for start in range(0, out_dim, CLIP_ROW_BATCH):
        wg = w[start:start + CLIP_ROW_BATCH].reshape(-1, n_groups, group_size)
        bounds.append(_clip_rows(wg, xg, bits, group_size))
    return torch.cat(bounds, dim=0)


def _clip_rows(wg: Tensor, xg: Tensor, bits: int, group_size: int) -> Tensor:
    """``wg [rows, groups, G]``, ``xg [tokens, groups, G]`` -> best bound ``[rows, groups]``."""
    ref = torch.einsum("tgk,rgk->rtg", xg, wg)
    absmax = wg.abs().amax(dim=-1)
    best_err = torch.full_like(absmax, math.inf)
    best = absmax.clone()
    rows = wg.shape[0]
    for i in range(int(CLIP_MAX_SHRINK * CLIP_GRID)):
        bound = absmax * (1 - i / CLIP_GRID)
        clipped = torch.maximum(torch.minimum(wg, bound[..., None]), -bound[..., None])
        q = fake_quantize(clipped.reshape(rows, -1), bits, group_size).reshape(wg.shape)
        err = (torch.einsum("tgk,rgk->rtg", xg, q) - ref).pow(2).mean(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, bound, best)
    return best


def apply_clip(weight: Tensor, bound: Tensor) -> Tensor:
    """Clamp ``weight [out, C]`` group-wise to ``[-bound, bound]`` (``bound [out, C // G]``)."""
    out_dim, in_dim = weight.shape
    g = bound.shape[1]
    b = bound.to(weight.dtype)[..., None]
    w = weight.reshape(out_dim, g, in_dim // g)
    return torch.maximum(torch.minimum(w, b), -b).reshape(out_dim, in_dim)
