import pytest
import torch

from tpserve.quant.pack import AWQ_ORDER, pack_awq, pack_int4, unpack_awq, unpack_int4
from tpserve.quant.quantize import dequantize_awq, dequantize_groupwise, fake_quantize, quantize_groupwise


def test_pack_round_trip():
    gen = torch.Generator().manual_seed(0)
    intweight = torch.randint(0, 16, (48, 40), generator=gen, dtype=torch.int32)
    zeros = torch.randint(0, 16, (3, 40), generator=gen, dtype=torch.int32)
    qweight, qzeros = pack_awq(intweight, zeros)
    assert qweight.shape == (48, 5) and qweight.dtype == torch.int32
    assert qzeros.shape == (3, 5) and qzeros.dtype == torch.int32
    back_w, back_z = unpack_awq(qweight, qzeros)
    assert torch.equal(back_w, intweight) and torch.equal(back_z, zeros)


@pytest.mark.parametrize("col", range(16))
def test_single_nibble_lands_in_awq_order(col):
    values = torch.zeros(2, 16, dtype=torch.int32)
    values[1, col] = 0xB
    packed = pack_int4(values)
    expected = torch.zeros(2, 2, dtype=torch.int64)
    nibble = AWQ_ORDER.index(col % 8)
    expected[1, col // 8] = 0xB << (4 * nibble)
    expected = torch.where(expected >= 2**31, expected - 2**32, expected).to(torch.int32)
    assert torch.equal(packed, expected)


def test_hand_built_word():
    # Column j holds j + 1; nibble i holds column [0,2,4,6,1,3,5,7][i] -> 0x86427531.
    values = torch.arange(1, 9, dtype=torch.int32)[None]
    word = pack_int4(values)
    assert word.item() == 0x86427531 - 2**32
    assert torch.equal(unpack_int4(word), values)


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_int4(torch.zeros(2, 12, dtype=torch.int32))
    with pytest.raises(ValueError, match="0..15"):
        pack_int4(torch.full((2, 8), 16, dtype=torch.int32))


@pytest.mark.parametrize("group_size", [16, 32])
def test_quantize_error_bound(group_size):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(24, 64, generator=gen)
    w[3, :group_size] = torch.rand(group_size, generator=gen) + 5.0  # an all-positive group
    w[5, :group_size] = 0.0  # a constant group
    intweight, scales, zeros = quantize_groupwise(w, bits=4, group_size=group_size)
    assert intweight.shape == (64, 24) and scales.shape == (64 // group_size, 24) == zeros.shape
    assert intweight.min() >= 0 and intweight.max() <= 15 and zeros.min() >= 0 and zeros.max() <= 15
    deq = dequantize_groupwise(intweight, scales, zeros)
    bound = scales.repeat_interleave(group_size, dim=0).t() / 2 + 1e-6
    assert torch.all((w - deq).abs() <= bound)
    assert torch.equal(fake_quantize(w, 4, group_size), deq)


def test_quantize_matches_float64_reference():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(8, 32, generator=gen, dtype=torch.float64)
    g = w.reshape(8, 2, 16)
    lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
    scale = (hi - lo) / 15
    zero = torch.round(-lo / scale)
    q = (torch.round(g / scale[..., None]) + zero[..., None]).clamp(0, 15)
    intweight, scales, zeros = quantize_groupwise(w.float(), 4, 16)
    assert torch.equal(intweight, q.reshape(8, 32).t().to(torch.int32))
    assert torch.allclose(scales.double(), scale.t(), rtol=1e-6)
    assert torch.equal(zeros, zero.t().to(torch.int32))


def test_dequantize_awq_packed():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(16, 64, generator=gen)
    intweight, scales, zeros = quantize_groupwise(w, 4, 32)
    qweight, qzeros = pack_awq(intweight, zeros)
    assert torch.equal(dequantize_awq(qweight, qzeros, scales), dequantize_groupwise(intweight, scales, zeros))


def test_quantize_rejects_bad_group():
    with pytest.raises(ValueError, match="group_size"):
        quantize_groupwise(torch.zeros(4, 48), 4, 32)
