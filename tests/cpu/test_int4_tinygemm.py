"""Repacking AutoAWQ weights for PyTorch's int4 matmul: the nibble order on a hand-built
tensor, and the dequantized weights against AWQ's within the bf16 rounding of the zero."""
import torch

from tpserve.kernels import int4_tinygemm
from tpserve.kernels.reference import awq_dequantize
from tpserve.kernels.testing import pack_awq, random_awq


def test_codes_hold_even_k_high_and_odd_k_low():
    k, n, g = 64, 16, 32
    q = (torch.arange(k)[:, None] + 3 * torch.arange(n)[None, :]) % 16
    z = torch.full((k // g, n), 3)
    scales = torch.ones(k // g, n)
    codes, sz = int4_tinygemm.awq_to_codes(pack_awq(q), scales, pack_awq(z))
    assert codes.dtype == torch.uint8 and codes.shape == (n, k // 2)
    for row in range(n):
        for i in range(k // 2):
            assert int(codes[row, i]) == (int(q[2 * i, row]) << 4) | int(q[2 * i + 1, row])
    # w = (q - 8) * scale + zero must equal (q - z) * s: zero = (8 - 3) * 1
    assert torch.equal(sz[..., 0], scales) and torch.equal(sz[..., 1], torch.full((k // g, n), 5.0))


def test_dequantized_weights_match_awq():
    for dtype, rtol in ((torch.float32, 1e-6), (torch.bfloat16, 2.0**-8)):
        qweight, scales, qzeros = random_awq(256, 48, 64, seed=3, dtype=dtype)
        codes, sz = int4_tinygemm.awq_to_codes(qweight, scales, qzeros)
        got = int4_tinygemm.dequantize_codes(codes, sz, 64).double()
        want = awq_dequantize(qweight, scales.float(), qzeros, 64).double()
        # the zero's rounding: at most rtol of |8 - z| * s, i.e. rtol * 8 * max s;
        # then the result's own rounding to dtype
        bound = rtol * 8 * scales.float().abs().max().item() + rtol * want.abs().max().item()
        assert (got - want).abs().max().item() <= bound
        assert (got - want).abs().max().item() > 0 or dtype == torch.float32


def test_only_bf16_on_cuda_qualifies():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not int4_tinygemm.supports(torch.bfloat16, cpu, 4096, 128)
    assert not int4_tinygemm.supports(torch.float16, cuda, 4096, 128)
    assert not int4_tinygemm.supports(torch.bfloat16, cuda, 4096, 100)
    assert not int4_tinygemm.supports(torch.bfloat16, cuda, 4160, 64)  # K not a multiple of 128


def test_awq_layers_keep_their_kernel_when_the_int4_matmul_fails(monkeypatch, caplog):
    """A torch build whose int4 kernels fail at load: one warning, and every layer keeps
    the AutoAWQ layout and its outputs."""
    from tpserve.parallel.linear import AWQMethod, ParallelLinear

    def broken_pack(*args):
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setattr(int4_tinygemm, "supports", lambda *args: True)
    monkeypatch.setattr(int4_tinygemm, "pack", broken_pack)
    method = AWQMethod(64)
    layers = [ParallelLinear(128, 16, False, method, torch.float32) for _ in range(3)]
    qweight, scales, qzeros = random_awq(128, 16, 64, seed=1, dtype=torch.float32)
    x = torch.randn(2, 128)
    for layer in layers:
        layer.qweight.copy_(qweight)
        layer.scales.copy_(scales)
        layer.qzeros.copy_(qzeros)
    want = layers[0](x)
    with caplog.at_level("WARNING"):
        for layer in layers:
            layer.finalize()
    assert all(layer.method is method for layer in layers)
    assert sum("int4 matmul is unavailable" in r.getMessage() for r in caplog.records) == 1
    torch.testing.assert_close(layers[2](x), want)
