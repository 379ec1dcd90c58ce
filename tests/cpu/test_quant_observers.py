import pytest
import torch

from tpserve.quant.observers import ChannelStats, export_stat_map, merge_stat_maps


def _check_equal(merged, whole):
    for name in ("max", "min", "absmax"):
        assert torch.equal(getattr(merged, name), getattr(whole, name))
    assert merged.count == whole.count
    assert torch.allclose(merged.mean, whole.mean, atol=1e-6)
    assert torch.allclose(merged.absmean, whole.absmean, atol=1e-6)


def test_merge_of_halves_equals_whole():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 13, 24, generator=gen) * torch.linspace(0.1, 10, 24)
    whole = ChannelStats().update(x)
    a, b = ChannelStats().update(x[:3]), ChannelStats().update(x[3:])
    _check_equal(a.merge(b), whole)
    flat = x.reshape(-1, 24).double()
    assert torch.equal(whole.max, x.reshape(-1, 24).amax(0))
    assert torch.allclose(whole.mean.double(), flat.mean(0), atol=1e-6)
    assert torch.allclose(whole.absmean.double(), flat.abs().mean(0), atol=1e-6)


def test_kv_channels_and_empty_merge():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(40, 2, 8, generator=gen)
    whole = ChannelStats(channel_dims=2).update(x)
    assert whole.max.shape == (2, 8)
    merged = ChannelStats(channel_dims=2).merge(ChannelStats(channel_dims=2))
    merged.merge(ChannelStats(2).update(x[:10])).merge(ChannelStats(2).update(x[10:]))
    _check_equal(merged, whole)
    assert torch.equal(whole.absmax, x.abs().amax(0))


def test_merge_maps_and_export():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(10, 4, generator=gen)
    parts = [{"a": ChannelStats().update(x[:5])}, {"a": ChannelStats().update(x[5:]), "b": ChannelStats().update(x)}]
    exported = export_stat_map(merge_stat_maps(parts))
    assert set(exported) == {"max", "min", "absmax", "mean", "absmean"}
    assert torch.equal(exported["min"]["a"], x.amin(0))
    assert torch.allclose(exported["mean"]["b"], x.mean(0), atol=1e-6)


def test_shape_mismatch_and_no_data():
    s = ChannelStats().update(torch.zeros(3, 4))
    with pytest.raises(ValueError):
        s.update(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="no data"):
        ChannelStats().to_dict()
