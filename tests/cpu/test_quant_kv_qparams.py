import pytest
import torch

from tpserve.engine.errors import ConfigError
from tpserve.quant.kv_qparams import compute_kv_qparams, load_kv_stats

HEADS, DIM, LAYERS = 4, 8, 2


def _stats(seed):
    gen = torch.Generator().manual_seed(seed)
    out = {name: {} for name in ("max", "min", "absmax", "mean", "absmean")}
    for layer in range(LAYERS):
        a = torch.randn(HEADS, DIM, generator=gen) * 3
        b = torch.randn(HEADS, DIM, generator=gen)
        out["max"][layer] = torch.maximum(a, b) + 0.5
        out["min"][layer] = torch.minimum(a, b) - 2.0
        out["absmax"][layer] = torch.maximum(out["max"][layer].abs(), out["min"][layer].abs())
        out["mean"][layer] = out["absmean"][layer] = torch.zeros(HEADS, DIM)
    return out


def _reference(stats, layer, rank, num_tp, symmetric):
    h = HEADS // num_tp
    sl = slice(rank * h, (rank + 1) * h)
    if symmetric:
        return stats["absmax"][layer][sl].double().max() / 127, torch.tensor(0.0, dtype=torch.float64)
    mx, mn = stats["max"][layer][sl].double().max(), stats["min"][layer][sl].double().min()
    return (mx - mn) / 255, (mx + mn) / 2


@pytest.mark.parametrize("num_tp", [1, 2])
@pytest.mark.parametrize("symmetric", [False, True])
def test_matches_float64(num_tp, symmetric):
    ks, vs = _stats(0), _stats(1)
    params = compute_kv_qparams(ks, vs, num_tp, symmetric=symmetric)
    assert sorted(params) == [(layer, rank) for layer in range(LAYERS) for rank in range(num_tp)]
    for (layer, rank), p in params.items():
        assert p.dtype == torch.float32 and p.shape == (4,)
        k_scale, k_zp = _reference(ks, layer, rank, num_tp, symmetric)
        v_scale, v_zp = _reference(vs, layer, rank, num_tp, symmetric)
        want = torch.stack([k_scale, k_zp, v_scale, v_zp]).float()
        assert torch.allclose(p, want, rtol=1e-6, atol=1e-7)


def test_per_head_and_roundtrip_range():
    ks, vs = _stats(2), _stats(3)
    params = compute_kv_qparams(ks, vs, 2, per_head=True)
    assert params[(0, 1)].shape == (2, 4)
    k_scale, k_zp = params[(0, 1)][1, 0], params[(0, 1)][1, 1]
    head = ks["max"][0][3]
    q = torch.round((head - k_zp) / k_scale)
    assert q.max() <= 128 and q.min() >= -128


def test_indivisible_tp_raises():
    with pytest.raises(ValueError, match="num_tp=3"):
        compute_kv_qparams(_stats(0), _stats(1), 3)


def test_load_missing_stats(tmp_path):
    with pytest.raises(ConfigError, match="lite calibrate"):
        load_kv_stats(str(tmp_path))
