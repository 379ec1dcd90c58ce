"""`lite kv_qparams`: int8 KV-cache scales and zero points from calibration statistics.

For every layer and tensor-parallel rank (the kv heads cut into ``num_tp``
contiguous chunks, as the weights are split), one (scale, zero point) pair
for K and one for V, over that rank's heads and all head dims::

    asymmetric: scale = (max - min) / (2**bits - 1),  zp = (max + min) / 2
    symmetric:  scale = absmax / (2**(bits-1) - 1),   zp = 0
    q = round((x - zp) / scale),  x ~= q * scale + zp

``per_head=True`` gives one pair per kv head of the rank instead.
"""

from pathlib import Path

import torch
from torch import Tensor

from tpserve.engine.errors import ConfigError

_MIN_SCALE = 1e-8
KEY_STATS_FILE = "key_stats.pth"
VALUE_STATS_FILE = "value_stats.pth"


def load_kv_stats(work_dir: str) -> tuple[dict, dict]:
    """The ``key_stats.pth`` / ``value_stats.pth`` that ``calibrate`` wrote into ``work_dir``."""
    paths = [Path(work_dir) / name for name in (KEY_STATS_FILE, VALUE_STATS_FILE)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ConfigError(
            f"missing {', '.join(missing)}; run `tpserve lite calibrate --work_dir {work_dir}` first"
        )
    return tuple(torch.load(p, map_location="cpu", weights_only=True) for p in paths)


def _rank_chunks(x: Tensor, num_tp: int, layer, what: str) -> tuple[Tensor, ...]:
    heads = x.shape[0]
    if num_tp < 1 or heads % num_tp:
        raise ValueError(
            f"layer {layer} {what} has {heads} kv heads, which do not split evenly over "
            f"num_tp={num_tp}; use a num_tp that divides {heads}"
        )
    return x.double().chunk(num_tp, dim=0)


def _reduce(x: Tensor, per_head: bool, fn) -> Tensor:
    """Reduce ``[heads, head_dim]`` to a scalar, or to ``[heads]`` when per head."""
    return fn(x, dim=1) if per_head else fn(x.reshape(-1), dim=0)


def _qparams(stats: dict, layer, num_tp: int, symmetric: bool, per_head: bool, bits: int, what: str):
    """Per rank: ``(scale, zp)`` float64 tensors, scalars or ``[heads_per_rank]``."""
    out = []
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        for amax in _rank_chunks(stats["absmax"][layer], num_tp, layer, what):
            scale = _reduce(amax, per_head, torch.amax) / qmax
            out.append((scale, torch.zeros_like(scale)))
        return out
    qrange = 2**bits - 1
    maxes = _rank_chunks(stats["max"][layer], num_tp, layer, what)
    mins = _rank_chunks(stats["min"][layer], num_tp, layer, what)
    for mx, mn in zip(maxes, mins):
        hi, lo = _reduce(mx, per_head, torch.amax), _reduce(mn, per_head, torch.amin)
        out.append(((hi - lo) / qrange, (hi + lo) / 2))
    return out


def compute_kv_qparams(
    key_stats: dict,
    value_stats: dict,
    num_tp: int,
    symmetric: bool = False,
    per_head: bool = False,
    bits: int = 8,
) -> dict[tuple[int, int], Tensor]:
    """``{(layer, rank): float32 Tensor[4] = (k_scale, k_zp, v_scale, v_zp)}``.

    ``key_stats`` / ``value_stats`` are the dicts of ``key_stats.pth`` /
    ``value_stats.pth`` (``{stat: {layer: Tensor[kv_heads, head_dim]}}``).
    With ``per_head`` each value is ``[heads_per_rank, 4]`` instead.
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    layers = sorted(key_stats["absmax"])
    if layers != sorted(value_stats["absmax"]):
        raise ValueError("key and value statistics cover different layers")
    result = {}
    for layer in layers:
        ks = _qparams(key_stats, layer, num_tp, symmetric, per_head, bits, "keys")
        vs = _qparams(value_stats, layer, num_tp, symmetric, per_head, bits, "values")
        for rank, ((k_scale, k_zp), (v_scale, v_zp)) in enumerate(zip(ks, vs)):
            packed = torch.stack([k_scale.clamp(min=_MIN_SCALE), k_zp, v_scale.clamp(min=_MIN_SCALE), v_zp], -1)
            result[(int(layer), rank)] = packed.float()
    return result
