"""Triton kernels (through Triton's CPU interpreter) against their torch twins.

The interpreter must be switched on before Triton is imported, so each kernel
group runs this file as a script in a fresh subprocess with
TRITON_INTERPRET=1 and TPSERVE_FORCE_TRITON=1; the test checks its exit code.
Shapes are tiny and awkward: odd token counts, GQA ratios 1/2/4, contexts that
end mid-block, cached prefixes, sliding windows, int8 KV, several AWQ groups.
The kernels that write into other GPUs' memory run here over host buffers whose
addresses stand in for the peers', one rank after the other, senders first.
"""

import itertools
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

GROUPS = ["elementwise", "kv_cache", "decode", "prefill", "w4a16", "slots"]


@pytest.mark.parametrize("group", GROUPS)
def test_triton_kernel_matches_reference(group):
    env = dict(os.environ, TRITON_INTERPRET="1", TPSERVE_FORCE_TRITON="1")
    proc = subprocess.run([sys.executable, __file__, group], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "checked" in proc.stdout


def _close(name, got, want, atol, rtol=0.0):
    err = (got.float() - want.float()).abs()
    bound = atol + rtol * want.float().abs()
    if not bool((err <= bound).all()):
        raise AssertionError(f"{name}: max abs error {err.max().item():.3g} exceeds tolerance")


def _elementwise(torch, kernels, ref):
    gen = torch.Generator().manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 2e-3)):
        x = torch.randn(7, 40, generator=gen).to(dtype)
        res = torch.randn(7, 40, generator=gen).to(dtype)
        w = torch.randn(40, generator=gen).to(dtype)
        _close("rms_norm", kernels.rms_norm(x, w, 1e-5), ref.rms_norm(x, w, 1e-5), tol)
        got, want = kernels.fused_add_rms_norm(x, res, w, 1e-6), ref.fused_add_rms_norm(x, res, w, 1e-6)
        _close("fused_add_rms_norm", got[0], want[0], tol)
        _close("fused_add_rms_norm residual", got[1], want[1], 0.0)
        g = torch.randn(5, 2 * 37, generator=gen).to(dtype)
        _close("silu_and_mul", kernels.silu_and_mul(g), ref.silu_and_mul(g), tol)
        for head_dim, nq, nkv in ((32, 4, 4), (16, 6, 3), (24, 8, 2)):
            inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
            cache = kernels.build_cos_sin_cache(inv, 50, 1.1)
            q = torch.randn(9, nq, head_dim, generator=gen).to(dtype)
            k = torch.randn(9, nkv, head_dim, generator=gen).to(dtype)
            pos = torch.randint(0, 50, (9,), generator=gen)
            for a, b in zip(kernels.apply_rotary(q, k, pos, cache),
                            ref.apply_rotary(q, k, pos, cache)):
                _close("apply_rotary", a, b, tol)
    from tpserve.kernels.gemv import gemv, gemv_silu_mul
    for dtype, tol in ((torch.float32, 1e-4), (torch.float16, 2e-3)):
        # preload: tiles past K, a remainder loop after 2 or 4 tiles, none preloaded early
        for n, k, launch in ((37, 300, {}), (37, 300, dict(block_n=8, block_k=64)),
                             (5, 2100, dict(block_n=2, block_k=256, num_warps=1, preload=4)),
                             (5, 2100, dict(block_n=2, block_k=256, preload=1))):
            x = torch.randn(1, k, generator=gen).to(dtype)
            w = torch.randn(n, k, generator=gen).to(dtype)
            want = x.double() @ w.double().T  # ragged edges in both N and K
            _close(f"gemv {n}x{k} {launch}", gemv(x, w, **launch), want, tol, tol)
            # [gate | up] of 2 * 37 or 2 * 5 rows: the odd last program of each half
            w2 = torch.randn(2 * n, k, generator=gen).to(dtype)
            gate_up = (x.double() @ w2.double().T).to(dtype).double()
            want = torch.nn.functional.silu(gate_up[:, :n]) * gate_up[:, n:]
            _close(f"gemv_silu_mul {n}x{k} {launch}", gemv_silu_mul(x, w2, **launch), want,
                   2 * tol, 2 * tol)
    from tpserve.kernels.embedding import vocab_embedding
    # a rank holding table rows [first, first + 11): ids below, inside and past it, and a
    # hidden size of two column blocks, the second ragged
    for dtype in (torch.float32, torch.bfloat16):
        w = torch.randn(11, 1300, generator=gen).to(dtype)
        for first in (0, 11):
            ids = torch.tensor([[first - 1, first, first + 10], [first + 11, first + 4, 0]])
            want = torch.zeros(2, 3, 1300, dtype=dtype)
            for i, j in ((0, 1), (0, 2), (1, 1), (1, 2)):
                if first <= ids[i, j] < first + 11:
                    want[i, j] = w[ids[i, j] - first]
            _close(f"vocab_embedding first={first}", vocab_embedding(ids, w, first), want, 0.0)
            _close(f"reference vocab_embedding first={first}", ref.vocab_embedding(ids, w, first),
                   want, 0.0)


def _store_both(torch, kernels, ref, p, static):
    caches = []
    for store in (kernels.store_kv_cache, ref.store_kv_cache):
        kc, vc = p.k_cache.clone(), p.v_cache.clone()
        ks = None if p.k_scales is None else p.k_scales.clone()
        vs = None if p.v_scales is None else p.v_scales.clone()
        store(p.k_new, p.v_new, kc, vc, p.slot_mapping, ks, vs, static)
        caches.append((kc, vc, ks, vs))
    return caches


def _kv_cache(torch, kernels, ref):
    from tpserve.kernels.testing import make_paged_problem
    for int8, static in ((False, None), (True, None), (True, (0.02, 0.1, 0.015, -0.05))):
        p = make_paged_problem([21, 5, 33], [21, 2, 17], 4, 2, 32, 16, int8=int8, seed=1)
        p.slot_mapping[3] = -1  # a padded token is skipped
        _same_caches("store_kv_cache", torch, *_store_both(torch, kernels, ref, p, static),
                     1e-6, 0.01)
    # rotary and the cache write in one kernel, against the two references in turn;
    # head dims 32 and 24 (not a power of two), GQA 2, a padded token
    for int8, static, d in ((False, None, 32), (True, None, 24),
                            (True, (0.02, 0.1, 0.015, -0.05), 32)):
        p = make_paged_problem([21, 5, 33], [21, 2, 17], 4, 2, d, 16, int8=int8, seed=2,
                               static_params=static)
        p.slot_mapping[4] = -1
        inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
        cos_sin = kernels.build_cos_sin_cache(inv, 64, 1.1)
        pos = torch.arange(p.q.shape[0]) % 60
        want_q, want_k = ref.apply_rotary(p.q, p.k_new, pos, cos_sin)
        caches = []
        for fused in (True, False):
            kc, vc = p.k_cache.clone(), p.v_cache.clone()
            # per-token scales are written, so each run gets its own; calibrated ones not
            ks, vs = ((p.k_scales.clone(), p.v_scales.clone()) if int8 and not static
                      else (p.k_scales, p.v_scales))
            if fused:
                q = kernels.rotate_and_store(p.q, p.k_new, p.v_new, pos, cos_sin, kc, vc,
                                             p.slot_mapping, ks, vs, static)
                _close("rotate_and_store queries", q, want_q, 2e-3)
            else:
                ref.store_kv_cache(want_k, p.v_new, kc, vc, p.slot_mapping, ks, vs, static)
            caches.append((kc, vc, ks, vs))
        _same_caches("rotate_and_store", torch, *caches, 2e-3, 0.02)
    _qkv_rotate_and_store(torch, kernels, ref)


def _qkv_rotate_and_store(torch, kernels, ref):
    """The one-row [q | k | v] GEMV that rotates and caches in its epilogue, against the
    projection in float64 rounded to the dtype, then the references: with and without
    bias, a head dim of 24, a last program with fewer pairs, K past the tiles, and a
    padding token (slot -1) that caches nothing."""
    from tpserve.kernels.gemv_rotary import qkv_rotate_and_store
    gen = torch.Generator().manual_seed(3)
    for dtype, tol in ((torch.float32, 1e-4), (torch.float16, 2e-3)):
        for nq, nkv, d, k, launch, slot in ((4, 2, 32, 300, dict(block_k=64), 21),
                                             (3, 1, 24, 300, dict(pairs=8, block_k=128), 5),
                                             (4, 2, 32, 200, dict(pairs=1, preload=1), -1)):
            x = torch.randn(1, k, generator=gen).to(dtype)
            w = (torch.randn((nq + 2 * nkv) * d, k, generator=gen) / k ** 0.5).to(dtype)
            inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
            cos_sin = kernels.build_cos_sin_cache(inv, 64, 1.1)
            pos, slots = torch.tensor([37]), torch.tensor([slot])
            for bias in (None, torch.randn(w.shape[0], generator=gen).to(dtype)):
                qkv = x.double() @ w.double().T + (0 if bias is None else bias.double())
                q, k_new, v = qkv.to(dtype).split([nq * d, nkv * d, nkv * d], dim=-1)
                want_q, want_k = ref.apply_rotary(q.reshape(1, nq, d), k_new.reshape(1, nkv, d),
                                                  pos, cos_sin)
                k0 = torch.randn(3, 16, nkv, d, generator=gen).to(dtype)
                v0 = torch.randn(3, 16, nkv, d, generator=gen).to(dtype)
                kc, vc, want_kc, want_vc = k0.clone(), v0.clone(), k0.clone(), v0.clone()
                got = qkv_rotate_and_store(x, w, bias, nq, nkv, pos, cos_sin, kc, vc, slots,
                                           **launch)
                ref.store_kv_cache(want_k, v.reshape(1, nkv, d), want_kc, want_vc, slots)
                name = f"qkv_rotate_and_store {nq}/{nkv}x{d} slot {slot}"
                _close(f"{name} queries", got, want_q, tol, tol)
                _close(f"{name} keys", kc, want_kc, tol, tol)
                _close(f"{name} values", vc, want_vc, tol, tol)


def _same_caches(name, torch, got, want, atol, int8_off):
    """(k_cache, v_cache, k_scales, v_scales) alike: floats within atol; int8 codes at
    most one step apart (rounding ties), on at most a fraction int8_off of them."""
    for a, b in zip(got, want):
        if a is None:
            continue
        if a.dtype == torch.int8:
            assert (a.int() - b.int()).abs().max() <= 1, name
            assert (a != b).float().mean() < int8_off, name
        else:
            _close(name, a, b, atol)


ATTN_CASES = [  # seq_lens, query_lens, nq, nkv, head_dim, window
    ([37, 1, 50], [1, 1, 1], 8, 2, 32, None),
    ([16, 33, 5], [1, 1, 1], 4, 4, 16, None),
    ([70, 9], [1, 1], 8, 2, 32, 20),
    ([1, 64, 31], [1, 1, 1], 4, 1, 32, None),
    ([90, 3, 41], [1, 1, 1], 2, 2, 32, 30),  # MHA with a window
]
PREFILL_CASES = [
    ([23, 40, 1], [23, 17, 1], 8, 2, 32, None),   # fresh prompt, cached prefix + chunk, decode
    ([50, 16], [50, 3], 4, 4, 16, None),
    ([45, 30], [30, 30], 8, 2, 32, 12),
    ([33, 20], [5, 20], 4, 1, 24, None),
    ([37, 50, 23, 9], [1, 1, 23, 1], 8, 2, 32, None),  # decodes first: run as decodes
    ([70, 30, 45], [1, 30, 2], 4, 4, 16, 20),
]


def _merge_by_arrivals(name, torch, kernels, args, decodes, want):
    """paged_attention with arrival counters: the split kernel merges its splits (in
    one load and in one split a step, from two splits on), and leaves the counters
    zeroed."""
    from tpserve.kernels import attention_decode
    from tpserve.kernels.attention_decode import arrival_counters
    arrivals = arrival_counters(decodes, args[1].shape[2], args[0].device)
    loose = args[:7] + (4 * args[7] + 100,) + args[8:]
    saved = attention_decode.MERGE_LOAD, attention_decode.MERGE_MIN_SPLITS
    for merge_load, bound in itertools.product((32, 1), (args, loose)):
        attention_decode.MERGE_LOAD, attention_decode.MERGE_MIN_SPLITS = merge_load, 2
        try:
            got = kernels.paged_attention(*bound, num_decodes=decodes, arrivals=arrivals)
        finally:
            attention_decode.MERGE_LOAD, attention_decode.MERGE_MIN_SPLITS = saved
        _close(f"paged_attention {name} merged by arrivals ({merge_load})", got, want,
               2e-3, 1e-2)
        assert not arrivals.any(), f"{name}: counters left {arrivals.tolist()}"


def _attention(torch, kernels, ref, cases):
    from tpserve.kernels.testing import make_paged_problem
    for i, (seqs, qlens, nq, nkv, d, window) in enumerate(cases):
        for int8 in (False, True):
            p = make_paged_problem(seqs, qlens, nq, nkv, d, 16, int8=int8, seed=i)
            ref.store_kv_cache(p.k_new, p.v_new, p.k_cache, p.v_cache, p.slot_mapping,
                               p.k_scales, p.v_scales)
            args = p.attention_args() + (d ** -0.5, window, p.k_scales, p.v_scales)
            want = ref.paged_attention(*args)
            decodes = next((b for b, n in enumerate(qlens) if n != 1), len(qlens))
            _close(f"paged_attention case {i} int8={int8}",
                   kernels.paged_attention(*args, num_decodes=decodes), want, 2e-3, 1e-2)
            if decodes:  # the last split program merges, at tight and loose bounds
                _merge_by_arrivals(f"case {i} int8={int8}", torch, kernels, args, decodes, want)
            if int8 and max(qlens) > 1 and decodes == 0:  # every int8 prefill dequantization
                from tpserve.kernels.attention_prefill import PrefillLaunch, prefill_attention
                for dequant in (0, 1, 2, 3):
                    launch = PrefillLaunch(block_n=16, dequant=dequant, max_block_m=16)
                    got = prefill_attention(*args[:7], *args[8:], launch=launch)
                    _close(f"prefill case {i} int8 {launch}", got, want, 2e-3, 1e-2)
            if int8 and max(qlens) > 1:  # calibrated: one broadcast pair, not written, read
                static = (0.03, 0.1, 0.02, -0.05)
                want_p, got_p = (make_paged_problem(seqs, qlens, nq, nkv, d, 16, int8=True,
                                                    seed=i, static_params=static)
                                 for _ in range(2))
                for store, q in ((ref.store_kv_cache, want_p), (kernels.store_kv_cache, got_p)):
                    store(q.k_new, q.v_new, q.k_cache, q.v_cache, q.slot_mapping, q.k_scales,
                          q.v_scales, static)
                assert torch.equal(got_p.k_cache, want_p.k_cache)
                assert torch.equal(got_p.v_cache, want_p.v_cache)
                s_args = [q.attention_args() + (d ** -0.5, window, q.k_scales, q.v_scales)
                          for q in (want_p, got_p)]
                _close(f"paged_attention case {i} int8 calibrated",
                       kernels.paged_attention(*s_args[1], static_params=static,
                                               num_decodes=decodes),
                       ref.paged_attention(*s_args[0]), 2e-3, 1e-2)
            if max(qlens) == 1:  # a CUDA graph passes a loose context bound (the session length)
                loose = args[:7] + (4 * max(seqs) + 100,) + args[8:]
                _close(f"decode case {i} int8={int8}, loose max_seq_len",
                       kernels.paged_attention(*loose), want, 2e-3, 1e-2)
            if max(qlens) == 1 and int8:  # the other int8 dequantizations of the launch table
                from tpserve.kernels.attention_decode import DecodeLaunch, decode_attention
                launches = [DecodeLaunch(block_n=16, dequant=dequant, prefetch=prefetch)
                            for dequant, prefetch in ((1, False), (2, False), (2, True))]
                if nq == nkv:  # MHA: the CUDA-core kernel
                    launches.append(DecodeLaunch(block_n=16, cuda_cores=True))
                for launch in launches:
                    got = decode_attention(*args[:5], *args[7:], launch=launch)
                    _close(f"decode case {i} int8 {launch}", got, want, 2e-3, 1e-2)
                # calibrated parameters: decode applies them without reading per-token scales
                static = (0.03, 0.1, 0.02, -0.05)
                p = make_paged_problem(seqs, qlens, nq, nkv, d, 16, int8=True, seed=i,
                                       static_params=static)
                ref.store_kv_cache(p.k_new, p.v_new, p.k_cache, p.v_cache, p.slot_mapping,
                                   p.k_scales, p.v_scales, static)
                args = p.attention_args() + (d ** -0.5, window, p.k_scales, p.v_scales)
                want = ref.paged_attention(*args)
                got = kernels.paged_attention(*args, static_params=static)
                _close(f"decode case {i} int8 static", got, want, 2e-3, 1e-2)
                launches = [DecodeLaunch(block_n=16, prefetch=prefetch) for prefetch in (0, 1)]
                if nq == nkv:
                    launches.append(DecodeLaunch(block_n=16, cuda_cores=True))
                for launch in launches:
                    got = decode_attention(*args[:5], *args[7:], static_params=static,
                                           launch=launch)
                    _close(f"decode case {i} int8 static {launch}", got, want, 2e-3, 1e-2)
                p.k_scales.zero_()  # proves the scales are not read
                p.v_scales.zero_()
                _close(f"decode case {i} int8 static, scales unread",
                       kernels.paged_attention(*args, static_params=static), want, 2e-3, 1e-2)


def _w4a16(torch, kernels, ref):
    from tpserve.kernels.testing import random_awq
    from tpserve.kernels import w4a16
    from tpserve.kernels.w4a16 import GemmLaunch, gemm_launch
    for k, n, g in ((96, 48, 32), (64, 40, 16), (32, 528, 16)):
        qweight, scales, qzeros = random_awq(k, n, g, seed=k)
        # float16 only: the interpreter gets bfloat16 dots wrong (the GPU tests cover it)
        for m in (1, 5, 20):  # 20 rows: the joined tile
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).half()
            want = ref.w4a16_gemm(x, qweight, scales, qzeros, g)
            got = kernels.w4a16_gemm(x, qweight, scales, qzeros, g)
            _close(f"w4a16_gemm m={m} k={k}", got, want, 2e-3, 2e-3)
            base = gemm_launch(m, g, cuda=False)
            # the tiles over 8 columns a word: edges in N, K split (8) or not
            for kind, block_np in itertools.product(("joined", "codes", "nibbles"), (2, 8, 16)):
                launch = GemmLaunch(base.block_m, block_np, base.block_k, kind=kind)
                got = kernels.w4a16_gemm(x, qweight, scales, qzeros, g, launch=launch)
                _close(f"w4a16_gemm {kind} m={m} k={k} np={block_np}", got, want, 2e-3, 2e-3)
        # the whole weight dequantized (exactly the reference's rounding), as the GEMM
        # does above FUSED_MAX_ROWS rows; 40 and 528 columns leave partial tiles
        for dtype in (torch.float16, torch.float32):
            got = w4a16.awq_dequantize(qweight, scales, qzeros, g, dtype)
            want = ref.awq_dequantize(qweight, scales.to(dtype), qzeros, g)
            _close(f"awq_dequantize k={k} n={n} {dtype}", got, want, 0.0)
        x = torch.randn(w4a16.FUSED_MAX_ROWS + 3, k, generator=torch.Generator().manual_seed(k))
        got = kernels.w4a16_gemm(x.half(), qweight, scales, qzeros, g)
        _close(f"w4a16_gemm dequantized k={k}", got,
               ref.w4a16_gemm(x.half(), qweight, scales, qzeros, g), 2e-3, 2e-3)


def _slots(torch, kernels, ref):
    from tpserve.kernels.embedding import vocab_embedding
    from tpserve.kernels.gemv import gemv
    from tpserve.kernels.peer_slots import SendTarget
    from tpserve.parallel import symm_all_reduce as sar

    gen = torch.Generator().manual_seed(3)
    # a decoder step's ends over 2 ranks, each one row: the embedding lookup and the LM
    # head's GEMV send their rows, then the joined all-reduce (no residual) and the
    # gather only take the peer's; slots of 2 halves x 2 ranks x 2000 elements
    world, slot, vocab, per_rank, hidden = 2, 2000, 37, 19, 24
    dtype = torch.bfloat16
    bufs = [torch.full((2 * world * slot,), -32768, dtype=torch.int16) for _ in range(world)]
    table_of_bufs = torch.tensor([b.data_ptr() for b in bufs], dtype=torch.int64)
    ptrs = table_of_bufs.data_ptr()
    table = torch.randn(world * per_rank, hidden, generator=gen).to(dtype)
    table[4] = -0.0
    head = torch.randn(world * per_rank, hidden, generator=gen).to(dtype)
    norm_w = torch.rand(hidden, generator=gen).to(dtype) + 0.5
    for token in (4, 30):
        tid = torch.tensor([token])
        rows = [vocab_embedding(tid, table[r * per_rank:(r + 1) * per_rank], r * per_rank,
                                SendTarget(ptrs, 1 * world * slot + r * slot, r, world))
                for r in range(world)]
        outs = []
        for r in range(world):
            out, res = torch.empty(1, hidden, dtype=dtype), torch.empty(1, hidden, dtype=dtype)
            sar._all_reduce_add_rms_norm_kernel[(1,)](
                rows[r], rows[r], rows[r], norm_w, out, res, ptrs, world * slot, slot, r,
                hidden, hidden, hidden, hidden, hidden, 1e-5, WORLD=world, HAS_BIAS=False,
                HAS_RESIDUAL=False, SENT=True, BLOCK=32)
            outs.append(out)
            _close(f"embedding row {token} rank {r}", res, table[token:token + 1], 0.0)
            _close(f"embedding norm {token} rank {r}", out,
                   ref.rms_norm(table[token:token + 1], norm_w, 1e-5), 1e-2, 2e-2)
        logits = [gemv(outs[r], head[r * per_rank:(r + 1) * per_rank],
                       send=SendTarget(ptrs, r * slot, r, world)) for r in range(world)]
        want = torch.cat(logits, -1)[:, :vocab].float()
        for r in range(world):
            got = torch.empty(1, vocab)
            sar._all_gather_kernel[(1, 2)](logits[r], got, ptrs, 0, slot, r, per_rank, vocab,
                                           per_rank, vocab, WORLD=world, SENT=True, BLOCK=16)
            _close(f"gathered logits {token} rank {r}", got, want, 0.0)
    # a row-parallel layer's one-row GEMV sends its partial sums (a row of them -0.0),
    # and the joined all-reduce adds them, the bias and the residual and normalizes; in
    # float16: the interpreter rounds float32 to bfloat16 by truncating
    k, hidden, dtype = 40, 24, torch.float16
    norm_w = norm_w.to(dtype)
    w = torch.randn(hidden, world * k, generator=gen).to(dtype)
    w[3] = 0.0
    x = -(torch.rand(1, world * k, generator=gen) + 0.1).to(dtype)
    bias = torch.randn(hidden, generator=gen).to(dtype)
    residual = (torch.randn(1, hidden, generator=gen) * 4).to(dtype)
    parts = [gemv(x[:, r * k:(r + 1) * k], w[:, r * k:(r + 1) * k].contiguous(),
                  send=SendTarget(ptrs, r * slot, r, world)) for r in range(world)]
    total = (parts[0].float() + parts[1].float()).to(dtype)
    h = ((total.float() + bias.float()).to(dtype).float() + residual.float()).to(dtype)
    for r in range(world):
        out, res = torch.empty(1, hidden, dtype=dtype), torch.empty(1, hidden, dtype=dtype)
        sar._all_reduce_add_rms_norm_kernel[(1,)](
            parts[r], bias, residual, norm_w, out, res, ptrs, 0, slot, r, hidden, hidden,
            hidden, hidden, hidden, 1e-5, WORLD=world, HAS_BIAS=True, HAS_RESIDUAL=True,
            SENT=True, BLOCK=32)
        _close(f"sent partial sums + bias + residual rank {r}", res, h, 0.0)
        _close(f"sent partial sums, normalized, rank {r}", out, ref.rms_norm(h, norm_w, 1e-5),
               1e-2, 2e-2)
    if not all(bool((b == -32768).all()) for b in bufs):
        raise AssertionError("a slot was left full")


def _main(group):
    import torch

    import tpserve.kernels as kernels
    from tpserve.kernels import reference as ref
    run = {"elementwise": _elementwise, "kv_cache": _kv_cache, "w4a16": _w4a16,
           "slots": _slots, "decode": lambda *a: _attention(*a, ATTN_CASES),
           "prefill": lambda *a: _attention(*a, PREFILL_CASES)}[group]
    torch.manual_seed(0)
    run(torch, kernels, ref)
    print("checked", group)


if __name__ == "__main__":
    _main(sys.argv[1])
