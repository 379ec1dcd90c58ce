"""Per-channel statistics with an exact merge, so calibration can be split over workers.

``ChannelStats`` reduces every leading dimension of its inputs and keeps one
value per channel; the channels are the last ``channel_dims`` dimensions:
``channel_dims=1`` for linear inputs/outputs (``[..., C]``),
``channel_dims=2`` for keys and values (``[..., kv_heads, head_dim]``).

max/min/absmax merge exactly; sums are kept in float64 and counts as integers,
so means merged from shards equal the one-pass means up to float64 rounding.
"""

import torch
from torch import Tensor

STAT_NAMES = ("max", "min", "absmax", "mean", "absmean")


class ChannelStats:
    def __init__(self, channel_dims: int = 1):
        if channel_dims < 1:
            raise ValueError(f"channel_dims must be >= 1, got {channel_dims}")
        self.channel_dims = channel_dims
        self.max: Tensor | None = None
        self.min: Tensor | None = None
        self.absmax: Tensor | None = None
        self.sum: Tensor | None = None
        self.abssum: Tensor | None = None
        self.count = 0

    @property
    def channel_shape(self) -> tuple[int, ...] | None:
        return None if self.max is None else tuple(self.max.shape)

    @torch.no_grad()
    def update(self, x: Tensor) -> "ChannelStats":
        """Fold in ``x [..., *channels]``; returns self."""
        if x.dim() < self.channel_dims:
            raise ValueError(f"expected at least {self.channel_dims} dims, got shape {tuple(x.shape)}")
        rows = x.detach().reshape(-1, *x.shape[x.dim() - self.channel_dims:]).float()
        if rows.shape[0] == 0:
            return self
        self._fold(
            rows.amax(0), rows.amin(0), rows.abs().amax(0),
            rows.sum(0, dtype=torch.float64), rows.abs().sum(0, dtype=torch.float64), rows.shape[0],
        )
        return self

    def merge(self, other: "ChannelStats") -> "ChannelStats":
        """Fold in another accumulator over the same channels; returns self."""
        if other.channel_dims != self.channel_dims:
            raise ValueError("cannot merge stats with different channel_dims")
        if other.count:
            self._fold(other.max, other.min, other.absmax, other.sum, other.abssum, other.count)
        return self

    def _fold(self, mx, mn, amx, s, abss, count) -> None:
        mx, mn, amx, s, abss = (t.cpu() for t in (mx, mn, amx, s, abss))
        if self.count == 0:
            self.max, self.min, self.absmax = mx.clone(), mn.clone(), amx.clone()
            self.sum, self.abssum = s.clone(), abss.clone()
        else:
            if mx.shape != self.max.shape:
                raise ValueError(f"channel shape {tuple(mx.shape)} != {tuple(self.max.shape)}")
            self.max = torch.maximum(self.max, mx)
            self.min = torch.minimum(self.min, mn)
            self.absmax = torch.maximum(self.absmax, amx)
            self.sum = self.sum + s
            self.abssum = self.abssum + abss
        self.count += count

    @property
    def mean(self) -> Tensor | None:
        return None if self.count == 0 else (self.sum / self.count).float()

    @property
    def absmean(self) -> Tensor | None:
        return None if self.count == 0 else (self.abssum / self.count).float()

    def to_dict(self) -> dict:
        """``{max, min, absmax, mean, absmean}`` float32 tensors of the channel shape, plus ``count``."""
        if self.count == 0:
            raise ValueError("no data was observed")
        out = {name: getattr(self, name) for name in STAT_NAMES}
        out["count"] = self.count
        return out


def merge_stat_maps(maps: list[dict]) -> dict:
    """Merge ``{key: ChannelStats}`` maps from several workers key by key (all keys kept)."""
    merged: dict = {}
    for stat_map in maps:
        for key, stats in stat_map.items():
            if key not in merged:
                merged[key] = ChannelStats(stats.channel_dims)
            merged[key].merge(stats)
    return merged


def export_stat_map(stat_map: dict) -> dict:
    """``{key: ChannelStats}`` -> ``{stat_name: {key: Tensor}}`` (the layout of the saved files)."""
    out = {name: {} for name in STAT_NAMES}
    for key, stats in stat_map.items():
        d = stats.to_dict()
        for name in STAT_NAMES:
            out[name][key] = d[name]
    return out
