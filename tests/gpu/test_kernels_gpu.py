"""Triton kernels on CUDA against their torch twins at Llama-3-8B shapes (bf16)."""

import pytest
import torch

import tpserve.kernels as kernels
from tpserve.kernels import attention_decode
from tpserve.kernels import reference as ref
from tpserve.kernels.attention_decode import DecodeLaunch, arrival_counters, decode_attention
from tpserve.kernels.attention_prefill import PrefillLaunch, prefill_attention
from tpserve.kernels.testing import make_paged_problem, random_awq

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

NQ, NKV, D, BLOCK, HIDDEN, INTER = 32, 8, 128, 64, 4096, 14336
BF16 = dict(dtype=torch.bfloat16, device="cuda")


def _close(got, want, atol, rtol):
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol)


def test_norms_activation_rotary():
    x, res = torch.randn(37, HIDDEN, **BF16), torch.randn(37, HIDDEN, **BF16)
    w = torch.randn(HIDDEN, **BF16)
    _close(kernels.rms_norm(x, w, 1e-5), ref.rms_norm(x, w, 1e-5), 2e-2, 1e-2)
    got, want = kernels.fused_add_rms_norm(x, res, w, 1e-5), ref.fused_add_rms_norm(x, res, w, 1e-5)
    _close(got[0], want[0], 2e-2, 1e-2)
    assert torch.equal(got[1], want[1])
    g = torch.randn(37, 2 * INTER, **BF16)
    _close(kernels.silu_and_mul(g), ref.silu_and_mul(g), 1e-2, 1e-2)
    inv = 1.0 / (500000.0 ** (torch.arange(0, D, 2, device="cuda").float() / D))
    cache = kernels.build_cos_sin_cache(inv, 8192)
    qkv = torch.randn(37, (NQ + 2 * NKV) * D, **BF16)  # q and k as strided views of qkv
    q = qkv[:, :NQ * D].view(37, NQ, D)
    k = qkv[:, NQ * D:(NQ + NKV) * D].view(37, NKV, D)
    pos = torch.randint(0, 8192, (37,), device="cuda")
    for a, b in zip(kernels.apply_rotary(q, k, pos, cache), ref.apply_rotary(q, k, pos, cache)):
        _close(a, b, 2e-2, 1e-2)


@pytest.mark.parametrize("int8", [False, True])
def test_store_kv_cache(int8):
    p = make_paged_problem([300, 4100], [300, 129], NQ, NKV, D, BLOCK, int8=int8, **BF16)
    p.slot_mapping[5] = -1
    caches = []
    for store in (kernels.store_kv_cache, ref.store_kv_cache):
        kc, vc = p.k_cache.clone(), p.v_cache.clone()
        ks = vs = None
        if int8:
            ks, vs = p.k_scales.clone(), p.v_scales.clone()
        store(p.k_new, p.v_new, kc, vc, p.slot_mapping, ks, vs)
        caches.append((kc, vc, ks, vs))
    for a, b in zip(*caches):
        if a is not None and a.dtype == torch.int8:
            assert (a.int() - b.int()).abs().max() <= 1
        elif a is not None:
            _close(a, b, 1e-6, 0)


ATTENTION = [  # seq_lens, query_lens, window
    ([4097, 1, 130, 2000, 64], [1, 1, 1, 1, 1], None),
    ([4500, 33, 700], [1, 1, 1], 1024),
    ([600, 4100, 77], [600, 300, 1], None),
    ([4100, 77, 3000, 600], [1, 1, 1, 300], None),  # decodes first: run as decodes
    ([2500, 1200], [700, 1200], 512),
    ([37 + 29 * i for i in range(40)], [1] * 40, None),  # one split: no parts to merge
]


@pytest.mark.parametrize("int8", [False, True, "static"])
@pytest.mark.parametrize("case", range(len(ATTENTION)))
def test_paged_attention(case, int8, monkeypatch):
    seqs, qlens, window = ATTENTION[case]
    static = (0.03, 0.1, 0.02, -0.05) if int8 == "static" else None
    p = make_paged_problem(seqs, qlens, NQ, NKV, D, BLOCK, int8=bool(int8), seed=case,
                           static_params=static, **BF16)
    kernels.store_kv_cache(p.k_new, p.v_new, p.k_cache, p.v_cache, p.slot_mapping,
                           p.k_scales, p.v_scales, static)
    args = p.attention_args() + (D ** -0.5, window, p.k_scales, p.v_scales)
    want = ref.paged_attention(*args)
    decodes = next((b for b, n in enumerate(qlens) if n != 1), len(qlens))
    _close(kernels.paged_attention(*args, static_params=static, num_decodes=decodes), want,
           1e-2, 2e-2)
    if decodes:  # the split kernel's last program merges (the engine's way at batch 1)
        monkeypatch.setattr(attention_decode, "MERGE_MIN_SPLITS", 2)
        arrivals = arrival_counters(decodes, NKV, p.q.device)
        for _ in range(2):  # the counters are left zeroed for the next launch
            _close(kernels.paged_attention(*args, static_params=static, num_decodes=decodes,
                                           arrivals=arrivals), want, 1e-2, 2e-2)
        assert not arrivals.any()
    if int8 and max(qlens) == 1:  # each way decode can read int8
        for dequant, prefetch in ((0, False), (1, False), (2, False), (2, True)):
            launch = DecodeLaunch(block_n=128, num_stages=1, dequant=dequant, prefetch=prefetch)
            got = decode_attention(*args[:5], *args[7:], static_params=static, launch=launch)
            _close(got, want, 1e-2, 2e-2)
    if int8 and max(qlens) > 1:  # each way prefill can read int8, every row as a prompt
        for dequant in (0, 1, 2, 3):
            launch = PrefillLaunch(block_n=128, num_stages=3, dequant=dequant)
            # 1 rounds each token's (scale, zero point) to bf16 before it dequantizes
            atol = 2e-2 if dequant == 1 else 1e-2
            _close(prefill_attention(*args[:7], *args[8:], launch=launch), want, atol, 2e-2)


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("case", [0, 1])
def test_decode_mha_int8_cuda_cores(case, static, monkeypatch):
    """One query head per kv head (Llama-2's layout): int8 decode on CUDA cores, the
    default for MHA with per-token or calibrated scales, at several tiles and warps,
    against the float reference and the tensor-core kernel."""
    seqs, qlens, window = ATTENTION[case]
    params = (0.03, 0.1, 0.02, -0.05) if static else None
    p = make_paged_problem(seqs, qlens, NQ, NQ, D, BLOCK, int8=True, seed=case,
                           static_params=params, **BF16)
    kernels.store_kv_cache(p.k_new, p.v_new, p.k_cache, p.v_cache, p.slot_mapping,
                           p.k_scales, p.v_scales, params)
    args = p.attention_args() + (D ** -0.5, window, p.k_scales, p.v_scales)
    want = ref.paged_attention(*args)
    for launch in (None, DecodeLaunch(block_n=32, num_warps=2, num_stages=1, cuda_cores=True),
                   DecodeLaunch(block_n=16, num_warps=1, num_stages=1, cuda_cores=True),
                   DecodeLaunch(block_n=128, num_warps=4, num_stages=2, cuda_cores=True),
                   DecodeLaunch(block_n=128, num_stages=1, dequant=2)):
        got = decode_attention(*args[:5], *args[7:], static_params=params, launch=launch)
        _close(got, want, 1e-2, 2e-2)
    monkeypatch.setattr(attention_decode, "MERGE_MIN_SPLITS", 2)  # merged by the last split
    arrivals = arrival_counters(len(seqs), NQ, p.q.device)
    got = decode_attention(*args[:5], *args[7:], static_params=params, arrivals=arrivals)
    _close(got, want, 1e-2, 2e-2)
    assert not arrivals.any()


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("head_dim", [64, 80, 256])
def test_decode_mha_int8_other_head_dims(head_dim, static):
    """The CUDA-core int8 decode at head dims whose tiles the layout spreads otherwise
    (64, 256) or pads (80), against the float reference."""
    params = (0.03, 0.1, 0.02, -0.05) if static else None
    p = make_paged_problem([700, 33, 1500], [1, 1, 1], 16, 16, head_dim, BLOCK, int8=True,
                           seed=head_dim, static_params=params, **BF16)
    kernels.store_kv_cache(p.k_new, p.v_new, p.k_cache, p.v_cache, p.slot_mapping,
                           p.k_scales, p.v_scales, params)
    args = p.attention_args() + (head_dim ** -0.5, None, p.k_scales, p.v_scales)
    want = ref.paged_attention(*args)
    for launch in (None, DecodeLaunch(block_n=64, num_warps=2, num_stages=1, cuda_cores=True)):
        got = decode_attention(*args[:5], *args[7:], static_params=params, launch=launch)
        _close(got, want, 1e-2, 2e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 2, 16, 64])
@pytest.mark.parametrize("k,n", [(4096, 14336), (14336, 4096)])
def test_w4a16_gemm(k, n, m, dtype):
    """Every kind of tile (the default for m, and the others) at both 16-bit dtypes."""
    from tpserve.kernels.w4a16 import KINDS, GemmLaunch, gemm_launch
    qweight, scales, qzeros = random_awq(k, n, 128, dtype=dtype, device="cuda")
    x = torch.randn(m, k, dtype=dtype, device="cuda")
    want = ref.w4a16_gemm(x, qweight, scales, qzeros, 128)
    tol = 1e-2 * want.float().abs().max().item()
    _close(kernels.w4a16_gemm(x, qweight, scales, qzeros, 128), want, tol, 1e-2)
    default = gemm_launch(m, 128, True)
    for kind in KINDS:
        launch = GemmLaunch(default.block_m, 8, 128, kind=kind)
        got = kernels.w4a16_gemm(x, qweight, scales, qzeros, 128, launch=launch)
        _close(got, want, tol, 1e-2)


@pytest.mark.parametrize("k,n", [(4096, 6144), (14336, 4096), (4096, 1000 * 8)])
def test_awq_dequantize_and_prompt_rows(k, n):
    """The dequantizing kernel gives the reference's weights bit for bit, and the GEMM's
    many-row path (dequantize, then cuBLAS) matches the reference product."""
    from tpserve.kernels.w4a16 import FUSED_MAX_ROWS, awq_dequantize
    for dtype in (torch.bfloat16, torch.float16):
        qweight, scales, qzeros = random_awq(k, n, 128, dtype=dtype, device="cuda")
        want = ref.awq_dequantize(qweight, scales, qzeros, 128)
        assert torch.equal(awq_dequantize(qweight, scales, qzeros, 128), want)
        for m in (FUSED_MAX_ROWS + 1, 1000):
            x = torch.randn(m, k, dtype=dtype, device="cuda")
            want = ref.w4a16_gemm(x, qweight, scales, qzeros, 128)
            tol = 1e-2 * want.float().abs().max().item()
            _close(kernels.w4a16_gemm(x, qweight, scales, qzeros, 128), want, tol, 1e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k", [(3072, 4096), (4096, 2048), (28672, 4096), (4096, 14336),
                                 (4100, 1000)])
def test_gemv_against_float64(n, k, dtype):
    """The one-row matmul at the Llama-3-8B shapes (whole and halved), and ragged ones."""
    from tpserve.kernels.gemv import gemv, linear
    x = torch.randn(1, k, device="cuda").to(dtype)
    w = (torch.randn(n, k, device="cuda") / k ** 0.5).to(dtype)
    want = x.double() @ w.double().T
    eps = torch.finfo(dtype).eps
    _close(gemv(x, w), want, 4 * eps, 4 * eps)
    # the layers' entry point takes it for one row, cuBLAS for more
    _close(linear(x.view(1, 1, k), w).view(1, n), want, 4 * eps, 4 * eps)
    x3 = torch.randn(3, k, device="cuda").to(dtype)
    _close(linear(x3, w), x3.double() @ w.double().T, 4 * eps, 4 * eps)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("inter,k", [(14336, 4096), (7168, 4096), (1000, 1000)])
def test_gemv_silu_mul_against_float64(inter, k, dtype):
    """The [gate | up] matmul and SwiGLU in one kernel, against float64 from the same
    rounded matmul outputs; the layers' entry point for 1 and 3 rows."""
    from tpserve.kernels.gemv import gemv_silu_mul, linear_silu_mul
    x = torch.randn(1, k, device="cuda").to(dtype)
    w = (torch.randn(2 * inter, k, device="cuda") / k ** 0.5).to(dtype)
    eps = torch.finfo(dtype).eps

    def want(rows):
        gate_up = (rows.double() @ w.double().T).to(dtype).double()
        return torch.nn.functional.silu(gate_up[:, :inter]) * gate_up[:, inter:]
    _close(gemv_silu_mul(x, w), want(x), 4 * eps, 4 * eps)
    _close(linear_silu_mul(x.view(1, 1, k), w).view(1, inter), want(x), 4 * eps, 4 * eps)
    x3 = torch.randn(3, k, device="cuda").to(dtype)
    _close(linear_silu_mul(x3, w), want(x3), 8 * eps, 8 * eps)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("nq,nkv,bias", [(NQ, NKV, False), (NQ // 2, NKV // 2, False),
                                         (28, 4, True)])
def test_qkv_rotate_and_store_against_float64(nq, nkv, bias, dtype):
    """The one-row [q | k | v] GEMV with rotary and the cache write in its epilogue, at
    the Llama-3-8B heads whole and halved for tp=2, and Qwen2-7B's (biased q/k/v), against
    the projection in float64, rounded, then the references; a padding token too."""
    from tpserve.kernels.gemv_rotary import qkv_rotate_and_store
    x = torch.randn(1, HIDDEN, device="cuda").to(dtype)
    w = (torch.randn((nq + 2 * nkv) * D, HIDDEN, device="cuda") / HIDDEN ** 0.5).to(dtype)
    b = torch.randn(w.shape[0], device="cuda").to(dtype) if bias else None
    inv = 1.0 / (500000.0 ** (torch.arange(0, D, 2, device="cuda").float() / D))
    cos_sin = kernels.build_cos_sin_cache(inv, 8192)
    pos = torch.tensor([5000], device="cuda")
    qkv = (x.double() @ w.double().T + (b.double() if bias else 0)).to(dtype)
    q, k, v = qkv.split([nq * D, nkv * D, nkv * D], dim=-1)
    want_q, want_k = ref.apply_rotary(q.view(1, nq, D), k.view(1, nkv, D), pos, cos_sin)
    eps = torch.finfo(dtype).eps
    for slot in (77, -1):
        slots = torch.tensor([slot], device="cuda")
        k0, v0 = torch.randn(2, 4, BLOCK, nkv, D, device="cuda").to(dtype)
        kc, vc, want_kc, want_vc = k0.clone(), v0.clone(), k0.clone(), v0.clone()
        got = qkv_rotate_and_store(x, w, b, nq, nkv, pos, cos_sin, kc, vc, slots)
        ref.store_kv_cache(want_k, v.view(1, nkv, D), want_kc, want_vc, slots)
        _close(got, want_q, 4 * eps, 4 * eps)
        _close(kc, want_kc, 4 * eps, 4 * eps)
        _close(vc, want_vc, 4 * eps, 4 * eps)


@pytest.mark.parametrize("m", [1, 5, 64])
@pytest.mark.parametrize("k,n", [(4096, 6144), (4096, 28672), (14336, 4096), (2048, 4096)])
def test_int4_tinygemm_matches_awq(k, n, m):
    """PyTorch's int4 matmul on the repacked AWQ weights against the dequantized matmul."""
    from tpserve.kernels import int4_tinygemm
    qweight, scales, qzeros = random_awq(k, n, 128, **BF16)
    assert int4_tinygemm.supports(torch.bfloat16, scales.device, k, 128)
    x = torch.randn(m, k, **BF16)
    want = ref.w4a16_gemm(x, qweight, scales, qzeros, 128)
    packed, scales_and_zeros = int4_tinygemm.pack(qweight, scales, qzeros)
    got = int4_tinygemm.int4_mm(x, packed, scales_and_zeros, 128)
    _close(got, want, 1e-2 * want.float().abs().max().item(), 1e-2)


def test_awq_layer_repacks_on_load_and_keeps_its_output():
    from tpserve.parallel.linear import AWQMethod, AWQTinyGemmMethod, ParallelLinear
    k, n = 4096, 1024
    qweight, scales, qzeros = random_awq(k, n, 128, **BF16)
    layer = ParallelLinear(k, n, False, AWQMethod(128), torch.bfloat16).cuda()
    layer.qweight.copy_(qweight)
    layer.scales.copy_(scales)
    layer.qzeros.copy_(qzeros)
    xs = [torch.randn(m, k, **BF16) for m in (1, 3, 8, 40)]
    wants = [layer(x) for x in xs]  # the Triton kernel on the AutoAWQ layout
    layer.finalize()
    assert isinstance(layer.method, AWQTinyGemmMethod)
    for x, want in zip(xs, wants):  # int4 matmul up to 4 rows, Triton above
        _close(layer(x), want, 1e-2 * want.float().abs().max().item(), 1e-2)
