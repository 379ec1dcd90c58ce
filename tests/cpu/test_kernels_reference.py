"""The plain-torch kernel twins against independent float64 / transformers results."""

import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import (LlamaRMSNorm, LlamaRotaryEmbedding,
                                                      apply_rotary_pos_emb)

from tpserve.kernels import reference as ref
from tpserve.kernels.testing import make_paged_problem, pack_awq, random_awq


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_llama_rmsnorm(dtype):
    norm = LlamaRMSNorm(48, eps=1e-5)
    norm.weight.data = torch.randn(48)
    norm = norm.to(dtype)
    x, res = torch.randn(5, 48, dtype=dtype), torch.randn(5, 48, dtype=dtype)
    assert torch.equal(ref.rms_norm(x, norm.weight, 1e-5), norm(x))
    out, new_res = ref.fused_add_rms_norm(x, res, norm.weight, 1e-5)
    assert torch.equal(new_res, x + res)
    assert torch.equal(out, norm(x + res))


def test_rotary_matches_transformers():
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, rope_theta=500000.0)
    rope = LlamaRotaryEmbedding(config)
    positions = torch.tensor([0, 3, 17, 127, 64, 5])
    q, k = torch.randn(6, 4, 16), torch.randn(6, 2, 16)
    cos, sin = rope(q, positions[None])
    want_q, want_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                          cos, sin)
    cache = ref.build_cos_sin_cache(rope.inv_freq, 128, rope.attention_scaling)
    got_q, got_k = ref.apply_rotary(q, k, positions, cache)
    torch.testing.assert_close(got_q, want_q[0].transpose(0, 1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_k, want_k[0].transpose(0, 1), atol=1e-5, rtol=1e-5)


def test_qkv_rotate_and_store_twin_matches_transformers():
    """The one-row q/k/v projection with rotary and the cache write (its plain-torch
    twin): queries and keys as transformers rotates the biased projection's output,
    values as projected, written at the token's slot and nowhere else; slot -1 writes
    nothing."""
    from tpserve.kernels.gemv_rotary import qkv_rotate_and_store
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, rope_theta=500000.0)
    rope = LlamaRotaryEmbedding(config)
    nq, nkv, d = 4, 2, 16
    x, w = torch.randn(1, 64), torch.randn((nq + 2 * nkv) * d, 64) / 8
    bias, pos = torch.randn(w.shape[0]), torch.tensor([37])
    cache = ref.build_cos_sin_cache(rope.inv_freq, 128, rope.attention_scaling)
    q, k, v = (x @ w.T + bias).split([nq * d, nkv * d, nkv * d], dim=-1)
    cos, sin = rope(q, pos[None])
    want_q, want_k = apply_rotary_pos_emb(q.view(1, 1, nq, d).transpose(1, 2),
                                          k.view(1, 1, nkv, d).transpose(1, 2), cos, sin)
    for slot in (6, -1):
        kc, vc = torch.zeros(3, 4, nkv, d), torch.zeros(3, 4, nkv, d)
        got = qkv_rotate_and_store(x, w, bias, nq, nkv, pos, cache, kc, vc, torch.tensor([slot]))
        torch.testing.assert_close(got, want_q[0].transpose(0, 1), atol=1e-5, rtol=1e-5)
        want_kc, want_vc = torch.zeros(12, nkv, d), torch.zeros(12, nkv, d)
        if slot >= 0:
            want_kc[slot], want_vc[slot] = want_k[0, :, 0], v.view(nkv, d)
        torch.testing.assert_close(kc.view(12, nkv, d), want_kc, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(vc.view(12, nkv, d), want_vc, atol=1e-5, rtol=1e-5)


def test_cos_sin_cache_applies_attention_scaling():
    inv = torch.tensor([1.0, 0.1])
    cache = ref.build_cos_sin_cache(inv, 4, attention_scaling=2.0)
    pos = torch.arange(4, dtype=torch.float64)[:, None] * inv.double()
    want = torch.cat([pos.cos(), pos.sin()], -1) * 2.0
    torch.testing.assert_close(cache.double(), want, atol=1e-6, rtol=0)


def test_silu_and_mul_float64():
    x = torch.randn(3, 10, dtype=torch.float64)
    gate, up = x[:, :5], x[:, 5:]
    want = gate / (1 + torch.exp(-gate)) * up
    torch.testing.assert_close(ref.silu_and_mul(x.float()).double(), want, atol=1e-6, rtol=0)


def _dense_attention(p, scale, window):
    """Float64 attention over each request's K/V read back densely from the cache."""
    outs = []
    nq, nkv = p.q.shape[1], p.k_cache.shape[2]
    for b in range(len(p.seq_lens)):
        s, lo, hi = int(p.seq_lens[b]), int(p.query_start_loc[b]), int(p.query_start_loc[b + 1])
        k = ref.gather_kv(p.k_cache, p.k_scales, p.block_tables[b], s).double()
        v = ref.gather_kv(p.v_cache, p.v_scales, p.block_tables[b], s).double()
        for i in range(hi - lo):
            pos = s - (hi - lo) + i
            keys = [j for j in range(s) if j <= pos and (window is None or j > pos - window)]
            for h in range(nq):
                kv = h // (nq // nkv)
                logits = torch.stack([p.q[lo + i, h].double() @ k[j, kv] for j in keys]) * scale
                w = torch.softmax(logits, 0)
                outs.append(((lo + i, h), (w[:, None] * v[keys, kv]).sum(0)))
    return outs


@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("int8", [False, True])
def test_paged_attention_matches_dense_float64(window, int8):
    p = make_paged_problem([19, 9, 4], [6, 1, 4], 4, 2, 8, 4, dtype=torch.float32, int8=int8)
    ref.store_kv_cache(p.k_new, p.v_new, p.k_cache, p.v_cache, p.slot_mapping,
                       p.k_scales, p.v_scales)
    scale = 8 ** -0.5
    got = ref.paged_attention(*p.attention_args(), scale, window, p.k_scales, p.v_scales)
    for (t, h), want in _dense_attention(p, scale, window):
        torch.testing.assert_close(got[t, h].double(), want, atol=1e-5, rtol=1e-5)


def test_store_kv_cache_skips_padding_and_writes_slots():
    p = make_paged_problem([5], [5], 2, 2, 4, 4, dtype=torch.float32)
    p.slot_mapping[2] = -1
    ref.store_kv_cache(p.k_new, p.v_new, p.k_cache, p.v_cache, p.slot_mapping)
    flat = p.k_cache.view(-1, 2, 4)
    for t, slot in enumerate(p.slot_mapping.tolist()):
        if slot >= 0:
            assert torch.equal(flat[slot], p.k_new[t])
    table = p.block_tables[0].long()
    skipped = table[0] * 4 + 2
    assert torch.equal(flat[skipped], torch.zeros(2, 4))


def test_int8_online_quantization_error_is_half_a_step():
    x = torch.randn(50, 3, 16) * 3 + 1
    q, scale, zp = ref.quantize_per_token(x, torch.float32)
    back = q.float() * scale[..., None] + zp[..., None]
    assert ((back - x).abs() <= scale[..., None] * 0.5001 + 1e-6).all()
    hi, lo = x.amax(-1), x.amin(-1)
    torch.testing.assert_close(scale, (hi - lo) / 255)
    torch.testing.assert_close(zp, (hi + lo) / 2)


def test_int8_static_params_use_lmdeploy_formula():
    p = make_paged_problem([3], [3], 2, 1, 4, 4, dtype=torch.float32, int8=True)
    params = (0.05, 0.2, 0.01, -0.1)
    ref.store_kv_cache(p.k_new, p.v_new, p.k_cache, p.v_cache, p.slot_mapping,
                       p.k_scales, p.v_scales, params)
    slots = p.slot_mapping
    want = torch.clamp(torch.round((p.k_new.double() - 0.2) / 0.05), -128, 127)
    assert (p.k_cache.view(-1, 1, 4)[slots].double() - want).abs().max() <= 1
    stored = p.v_scales[slots // 4, slots % 4]  # block size 4
    torch.testing.assert_close(stored[..., 0], torch.full((3, 1), 0.01))
    torch.testing.assert_close(stored[..., 1], torch.full((3, 1), -0.1))


def test_awq_packing_order_by_hand():
    # output column j of the first packed word holds value j+1
    word = sum((order + 1) << (4 * i) for i, order in enumerate((0, 2, 4, 6, 1, 3, 5, 7)))
    assert word == 0x86427531
    packed = pack_awq(torch.arange(1, 9)[None])
    assert packed.item() == word - 2**32
    assert ref.unpack_awq(packed).tolist() == [list(range(1, 9))]


def test_awq_dequantize_and_gemm_float64():
    k, n, g = 64, 24, 16
    qweight, scales, qzeros = random_awq(k, n, g, dtype=torch.float32, seed=3)
    q, z = ref.unpack_awq(qweight).double(), ref.unpack_awq(qzeros).double()
    w = torch.empty(k, n, dtype=torch.float64)
    for row in range(k):
        w[row] = (q[row] - z[row // g]) * scales[row // g].double()
    torch.testing.assert_close(ref.awq_dequantize(qweight, scales, qzeros, g).double(), w)
    x = torch.randn(3, k)
    torch.testing.assert_close(ref.w4a16_gemm(x, qweight, scales, qzeros, g).double(),
                               x.double() @ w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sms", [4, 78, 132])
def test_w4a16_k_split_covers_k_and_fills_the_gpu(sms):
    """Every K step lands in exactly one split; K is split only while the output tiles
    leave the GPU short of 1.5 programs an SM, then to about 2.5 programs an SM,
    at least 4 steps a split and at most 16 splits."""
    from tpserve.kernels.w4a16 import _splits
    for iters in (1, 3, 4, 16, 32, 56, 112, 1000):
        for tiles in (1, 5, 16, 48, 96, 112, 197, 198, 224, 448):
            splits, per = _splits(iters, tiles, sms)
            assert (splits - 1) * per < iters <= splits * per, (iters, tiles)
            if 2 * tiles >= 3 * sms or iters < 8:
                assert splits == 1, (iters, tiles)
                continue
            assert splits <= 16 and per >= 4, (iters, tiles, splits, per)
            # the programs reach 2.5 an SM unless the 4-step or 16-split floor stops them
            if splits < min(16, iters // 4):
                assert tiles * splits >= 2.5 * sms - tiles, (iters, tiles, splits)


@pytest.mark.parametrize("sms", [4, 78, 132])
def test_w4a16_even_k_split_divides_k_nearest_the_wanted_programs(sms):
    """The joined tile's split (even=True): a divisor of the K steps, at least 4 steps
    a split and at most 16 splits, and no other such divisor nearer (by ratio) to 2.5
    programs an SM; unsplit where the tiles fill the GPU as the rule above."""
    from tpserve.kernels.w4a16 import _splits
    for iters in (1, 3, 4, 16, 32, 56, 112, 1000):
        for tiles in (1, 5, 16, 48, 64, 96, 197, 198, 448):
            splits, per = _splits(iters, tiles, sms, even=True)
            assert splits * per == iters, (iters, tiles, splits, per)
            if 2 * tiles >= 3 * sms:
                assert splits == 1
                continue
            assert splits <= 16 and (splits == 1 or per >= 4), (iters, tiles, splits)
            want = 2.5 * sms / tiles
            for d in range(1, 17):
                if iters % d == 0 and (d == 1 or iters // d >= 4):
                    assert abs(math.log(splits / want)) <= abs(math.log(d / want)) + 1e-12
    # the sweep's cases on an H100 (132 SMs): 64 tiles of 32 steps in 4, 48 in 8
    assert _splits(32, 64, 132, even=True) == (4, 8)
    assert _splits(32, 48, 132, even=True) == (8, 4)


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("int8", [False, True])
def test_batched_decode_attention_matches_per_request_loop(window, int8):
    """The CPU decode path (all requests at once, padded to the longest context)
    equals the per-request reference, which the test above checks in float64:
    GQA 3:1, contexts of 1 token, exactly one page, and across page boundaries."""
    seq_lens = [1, 4, 9, 23, 16]
    p = make_paged_problem(seq_lens, [1] * len(seq_lens), 6, 2, 8, 4, dtype=torch.float32,
                           int8=int8, seed=3)
    ref.store_kv_cache(p.k_new, p.v_new, p.k_cache, p.v_cache, p.slot_mapping,
                       p.k_scales, p.v_scales)
    scale = 8 ** -0.5
    want = ref.paged_attention(*p.attention_args(), scale, window, p.k_scales, p.v_scales)
    got = ref.decode_attention(p.q, p.k_cache, p.v_cache, p.block_tables, p.seq_lens, scale,
                               window, p.k_scales, p.v_scales)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_calibrated_cache_keeps_one_pair_a_layer():
    """With calibrated parameters the int8 cache has no memory per token for scales:
    each layer's keys and values read one (scale, zero point) through a broadcast
    view, the writes leave it, and attention gives what a cache with the same pair
    stored for every token gives."""
    from tpserve.engine.kv_cache import KVCache

    params = [(0.05, 0.2, 0.01, -0.1), (0.03, -0.4, 0.02, 0.3)]
    p = make_paged_problem([9, 5], [3, 5], 4, 2, 8, 4, dtype=torch.float32, int8=True, seed=1)
    blocks = p.k_cache.shape[0]
    cache = KVCache.allocate(2, blocks, 4, 2, 8, torch.float32, torch.device("cpu"), True,
                             params)
    # the four calibrated numbers of each layer, for keys and values
    assert cache.k_scales.untyped_storage().nbytes() == 2 * 4 * 4
    assert cache.v_scales.untyped_storage().nbytes() == 2 * 4 * 4
    layer = cache.layer(1)
    assert torch.allclose(layer.k_scales[3, 2, 1], torch.tensor([0.03, -0.4]))
    assert torch.allclose(layer.v_scales[0, 0, 0], torch.tensor([0.02, 0.3]))
    codes = KVCache.bytes_per_block(2, 4, 2, 8, torch.float32, int8=True,
                                    per_token_scales=False)
    assert codes == 2 * 2 * 4 * 2 * 8
    assert KVCache.bytes_per_block(2, 4, 2, 8, torch.float32, int8=True) == codes + 2 * 2 * 4 * 2 * 8

    # the same tokens through a cache with per-token scales and one with the broadcast pair
    per_token = (p.k_cache, p.v_cache, p.k_scales, p.v_scales)
    shared = (layer.k, layer.v, layer.k_scales, layer.v_scales)
    for kc, vc, ks, vs in (per_token, shared):
        every = torch.arange(blocks * 4)  # every slot, written with the pair
        kv = torch.randn(len(every), 2, 8, generator=torch.Generator().manual_seed(2))
        ref.store_kv_cache(kv, kv * 0.5, kc, vc, every, ks, vs, params[1])
    assert torch.equal(shared[0], per_token[0]) and torch.equal(shared[1], per_token[1])
    assert torch.allclose(layer.k_scales[0, 0, 0], torch.tensor([0.03, -0.4]))  # not written
    got = [ref.paged_attention(p.q, kc, vc, p.block_tables, p.seq_lens, p.query_start_loc,
                               p.max_query_len, p.max_seq_len, 8 ** -0.5, None, ks, vs)
           for kc, vc, ks, vs in (per_token, shared)]
    torch.testing.assert_close(got[1], got[0], rtol=0, atol=0)


def test_calibrated_scales_need_their_params():
    """Online quantization would write a pair per token into one shared pair: refused."""
    from tpserve.kernels import store_kv_cache
    from tpserve.kernels.kv_cache import calibrated_scales

    p = make_paged_problem([5], [5], 2, 2, 8, 4, dtype=torch.float32, int8=True)
    ks, vs = calibrated_scales((0.1, 0.0, 0.1, 0.0), p.k_cache.shape)
    with pytest.raises(ValueError, match="static_params"):
        store_kv_cache(p.k_new, p.v_new, p.k_cache, p.v_cache, p.slot_mapping, ks, vs)
    with pytest.raises(ValueError, match="do not fit"):
        calibrated_scales((0.1, 0.0, 0.1), p.k_cache.shape)


def test_bad_kernel_switches_warn_and_keep_the_default(monkeypatch, caplog):
    """A mistyped TPSERVE_GEMV / TPSERVE_ALLREDUCE / TPSERVE_STEP_CHANNEL / TPSERVE_PDL
    names the values it takes."""
    from tpserve.kernels import gemv
    from tpserve.parallel import symm_all_reduce

    for raw, want in (("0", False), ("1", True), ("off", True)):
        monkeypatch.setenv("TPSERVE_GEMV", raw)
        assert gemv._enabled_from_env() is want
    assert "TPSERVE_GEMV='off' is not 0 or 1" in caplog.text
    for raw, want in (("nccl", "nccl"), ("unfused", "unfused"), ("NCCL", "auto")):
        monkeypatch.setenv("TPSERVE_ALLREDUCE", raw)
        assert symm_all_reduce.all_reduce_mode() == want
    assert "'NCCL' is not one of auto, nccl, unfused" in caplog.text
    from tpserve.kernels.switches import env_choice
    monkeypatch.setenv("TPSERVE_STEP_CHANNEL", "shm")
    assert env_choice("TPSERVE_STEP_CHANNEL", ("auto", "gloo"), "auto") == "auto"
    assert "TPSERVE_STEP_CHANNEL='shm' is not auto or gloo; using auto" in caplog.text
    # PDL never applies without a Hopper GPU, whatever the switch says; a typo warns
    from tpserve.kernels import pdl
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for raw in ("0", "1", "yes"):
        monkeypatch.setenv("TPSERVE_PDL", raw)
        assert pdl._enabled_from_env() is False
    assert "TPSERVE_PDL='yes' is not 0 or 1" in caplog.text


def _waits_for_prior(kernel, module, depth: int = 0) -> bool:
    """Whether a Triton kernel, or a jit helper of its module that it calls, runs
    kernels/pdl.py's `start()` or `wait_prior()`."""
    import ast
    import inspect

    src = inspect.getsource(kernel.fn)
    if "start()" in src or "wait_prior()" in src:
        return True
    called = {n.func.id for n in ast.walk(ast.parse(inspect.cleandoc("\n" + src)))
              if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    return depth < 3 and any(
        _waits_for_prior(getattr(module, name), module, depth + 1) for name in called
        if hasattr(getattr(module, name, None), "fn"))


def test_every_pdl_launch_waits_for_the_kernel_before():
    """A kernel launched as a programmatic dependent (`**launch_kwargs(...)`) may start
    before the kernel before it ends: unless it waits for it, it reads stale inputs."""
    import ast
    import inspect

    pytest.importorskip("triton")
    from tpserve.kernels import attention_decode, embedding, gemv, rmsnorm, rotary
    from tpserve.parallel import symm_all_reduce

    launches = 0
    for module in (attention_decode, embedding, gemv, rmsnorm, rotary, symm_all_reduce):
        for node in ast.walk(ast.parse(inspect.getsource(module))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript)):
                continue
            if not any(k.arg is None and isinstance(k.value, ast.Call)
                       and getattr(k.value.func, "id", "") == "launch_kwargs"
                       for k in node.keywords):
                continue
            name = node.func.value.id
            launches += 1
            assert _waits_for_prior(getattr(module, name), module), \
                f"{module.__name__}.{name} is launched with launch_kwargs but never waits"
    assert launches >= 10  # GEMVs, norms, rotary + cache write, decode attention,
    # all-reduce and gather, embedding
