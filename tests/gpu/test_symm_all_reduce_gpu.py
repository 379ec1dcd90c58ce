"""The one-shot symmetric-memory all-reduce equals NCCL's, and the all-reduce joined
with the bias add, residual add and RMSNorm equals NCCL's all-reduce followed by
those steps, eagerly and replayed from a CUDA graph, on decode-sized messages of
awkward widths and partial sums of -0.0 (the joined kernel's empty-slot mark),
over 2 GPUs; and a row-parallel layer whose one-row GEMV sends its partial sums to
the peer itself, the all-reduce after it only waiting for them; and a decoder
step's ends, the vocab-parallel embedding and the gathered logits."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
    pytest.skip("needs 2 CUDA devices", allow_module_level=True)

SHAPES = [(1, 4096), (3, 5120), (7, 8), (64, 4096)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_main(rank: int, world: int, port: int, results: dict) -> None:
    import faulthandler

    import torch.distributed as dist

    from tpserve.parallel.process_group import join_local_gpus

    faulthandler.dump_traceback_later(120, exit=True)  # a hung barrier fails the test
    group, device = join_local_gpus(rank, world, port)
    group.prepare_all_reduce(torch.bfloat16, device)
    errors = []
    gen = torch.Generator(device).manual_seed(100 + rank)
    for shape in SHAPES:
        for _ in range(20):  # back to back: the buffer is reused at once
            x = torch.randn(shape, generator=gen, device=device).to(torch.bfloat16)
            want = x.clone()
            dist.all_reduce(want)
            errors.append((group.all_reduce(x.clone()) - want).abs().max().item())
    # in a graph: the one-shot path reads its input from a static buffer each replay
    static = torch.zeros(5, 4096, dtype=torch.bfloat16, device=device)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        group.all_reduce(static.clone())
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = group.all_reduce(static * 1)
    for _ in range(10):
        static.copy_(torch.randn(static.shape, generator=gen, device=device))
        want = static.clone()
        dist.all_reduce(want)
        graph.replay()
        errors.append((out - want).abs().max().item())
    results[rank] = (group.one_shot is not None, max(errors), fused_errors(group, device, gen),
                     sent_errors(group, device, gen), vocab_errors(group, device))
    dist.barrier()
    os._exit(0)  # destroy_process_group can wait forever on symmetric-memory teardown


def unfused(x, residual, weight, bias):
    import torch.distributed as dist

    from tpserve.kernels import fused_add_rms_norm

    total = x.clone()
    dist.all_reduce(total)
    if bias is not None:
        total = total + bias
    return fused_add_rms_norm(total, residual, weight, 1e-5)


def fused_errors(group, device, gen) -> float:
    """Largest difference of the joined kernel from NCCL + the separate kernels,
    relative to the values' scale, over back-to-back calls and graph replays."""
    def rand(*shape, scale=1.0):  # the same weights and bias on every rank
        return (torch.randn(shape, generator=gen, device=device) * scale).to(torch.bfloat16)

    errs = []
    for rows, hidden in [(1, 4096), (3, 5120), (7, 8), (64, 4096)]:
        weight = torch.ones(hidden, dtype=torch.bfloat16, device=device) + 0.1
        for i in range(12):  # back to back, the halves in turn
            bias = weight * 0.5 if i % 3 == 0 else None
            x, residual = rand(rows, hidden), rand(rows, hidden, scale=4)
            if i == 4:  # -0.0 marks an empty slot: it must travel, as +0.0, not hang
                x = torch.full_like(x, -0.0)
            elif i == 7:
                x[:, ::3] = -0.0
            out, res = group.all_reduce_add_rms_norm(x, residual, weight, 1e-5, bias, i % 2)
            want_out, want_res = unfused(x, residual, weight, bias)
            errs += [(res - want_res).abs().max().item() / 4, (out - want_out).abs().max().item()]
    x, residual = rand(5, 4096), rand(5, 4096)
    weight = torch.ones(4096, dtype=torch.bfloat16, device=device)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for half in (0, 1):
            group.all_reduce_add_rms_norm(x, residual, weight, 1e-5, None, half)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # two calls a replay, as a decoder layer makes
        mid, mid_res = group.all_reduce_add_rms_norm(x, residual, weight, 1e-5, None, 0)
        out, res = group.all_reduce_add_rms_norm(mid, mid_res, weight, 1e-5, None, 1)
    for _ in range(10):
        x.copy_(rand(5, 4096))
        residual.copy_(rand(5, 4096))
        graph.replay()
        want_mid, want_mid_res = unfused(x, residual, weight, None)
        want_out, want_res = unfused(want_mid, want_mid_res, weight, None)
        errs += [(mid - want_mid).abs().max().item(), (out - want_out).abs().max().item(),
                 (res - want_res).abs().max().item() / 4]
    return max(errs)


def sent_errors(group, device, gen) -> tuple[bool, float]:
    """(every one-row call sent, largest difference from NCCL + the separate kernels)
    for a row-parallel layer's `partial` finished by the joined all-reduce: sent and
    not sent in turn, rows of -0.0 among the sums, and two calls a CUDA graph replay."""
    from tpserve.kernels.gemv import gemv
    from tpserve.parallel.linear import ParallelLinear, UnquantizedMethod

    hidden, k = 4096, 2048
    layers = []
    for bias in (True, False):
        layer = ParallelLinear(k, hidden, bias, UnquantizedMethod(), torch.bfloat16,
                               reduce=group).to(device)
        layer.weight.copy_(torch.randn(hidden, k, generator=gen, device=device) / k ** 0.5)
        layer.weight[::5] = 0.0  # with x < 0 these rows sum to -0.0
        if bias:
            layer.bias.copy_(torch.linspace(-1, 1, hidden, device=device))
        layers.append(layer)
    norm_w = torch.ones(hidden, dtype=torch.bfloat16, device=device) + 0.1

    def finish(layer, x, residual, half):
        p = layer.partial(x, half)
        out, res = group.all_reduce_add_rms_norm(p.sums, residual, norm_w, 1e-5, p.bias,
                                                 p.half, p.sent)
        return p.sent, out, res

    def want(layer, x, residual):
        return unfused(gemv(x, layer.weight), residual, norm_w, layer.bias)

    all_sent, errs = True, []
    for i in range(12):
        layer = layers[i % 2]
        rows = 1 if i % 3 else 2  # two rows: cuBLAS, not sent
        x = -(torch.rand(rows, k, generator=gen, device=device) + 0.1).to(torch.bfloat16)
        residual = torch.randn(rows, hidden, generator=gen, device=device).to(torch.bfloat16)
        sent, out, res = finish(layer, x, residual, i % 2)
        all_sent &= sent == (rows == 1)
        if rows == 1:
            want_out, want_res = want(layer, x, residual)
            errs += [(out - want_out).abs().max().item(), (res - want_res).abs().max().item() / 8]
    x = torch.randn(1, k, generator=gen, device=device).to(torch.bfloat16)
    residual = torch.randn(1, hidden, generator=gen, device=device).to(torch.bfloat16)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for half in (0, 1):
            finish(layers[half], x, residual, half)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _, mid, mid_res = finish(layers[0], x, residual, 0)
        _, out, res = finish(layers[1], mid[:, :k].contiguous(), mid_res, 1)
    for _ in range(10):
        x.copy_(torch.randn(1, k, generator=gen, device=device))
        residual.copy_(torch.randn(1, hidden, generator=gen, device=device))
        graph.replay()
        want_mid, want_mid_res = want(layers[0], x, residual)
        want_out, want_res = want(layers[1], want_mid[:, :k].contiguous(), want_mid_res)
        errs += [(mid - want_mid).abs().max().item(), (out - want_out).abs().max().item()]
    return all_sent, max(errs)


def vocab_errors(group, device) -> tuple[bool, float]:
    """(every one-id lookup and one-row head sent, largest difference from whole-table
    references) for a decoder step's ends: the vocab-parallel embedding finished by
    the joined all-reduce with no residual (half 1), and the LM head's logits
    gathered (half 0). One, three and no rows, a row of -0.0 in the table, eagerly
    and as a CUDA graph of one step replayed back to back."""
    from tpserve.kernels import rms_norm
    from tpserve.kernels.gemv import linear
    from tpserve.parallel.linear import ParallelLMHead, VocabParallelEmbedding

    gen = torch.Generator(device).manual_seed(7)  # the same tables on every rank
    vocab, padded, hidden, world = 32003, 32256, 4096, group.world_size
    table = torch.randn(padded, hidden, generator=gen, device=device).to(torch.bfloat16)
    table[5] = -0.0
    head_w = (torch.randn(padded, hidden, generator=gen, device=device) / 64).to(torch.bfloat16)
    emb = VocabParallelEmbedding(padded, hidden, torch.bfloat16, group).to(device)
    emb.weight.copy_(table[emb.start:emb.start + emb.per_rank])
    head = ParallelLMHead(padded, hidden, vocab, torch.bfloat16, group).to(device)
    head.weight.copy_(head_w[emb.start:emb.start + emb.per_rank])
    norm_w = torch.ones(hidden, dtype=torch.bfloat16, device=device) + 0.1

    def step(ids):
        p = emb.partial(ids, half=1)
        x, res = group.all_reduce_add_rms_norm(p.sums, None, norm_w, 1e-5, None, p.half, p.sent)
        return p.sent, x, res, head(x, half=0)

    def errors(ids, x, res, logits):
        shards = head_w.view(world, -1, hidden)
        want_logits = torch.cat([linear(x, w) for w in shards], -1)[:, :vocab].float()
        return [(res.float() - table[ids].float()).abs().max().item(),
                (x - rms_norm(table[ids], norm_w, 1e-5)).abs().max().item(),
                (logits - want_logits).abs().max().item()]

    all_sent, errs = True, [0.0]
    for i in range(12):
        rows = (1, 3, 0)[i % 3]
        ids = torch.randint(0, vocab, (rows,), generator=gen, device=device)
        if i == 3:
            ids[0] = 5
        sent, x, res, logits = step(ids)
        all_sent &= sent == (rows == 1)
        if logits.shape != (rows, vocab):
            return False, float("inf")
        if rows:
            errs += errors(ids, x, res, logits)
    ids = torch.tensor([5], device=device)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        step(ids)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _, x, res, logits = step(ids)
    for _ in range(10):
        ids.copy_(torch.randint(0, vocab, (1,), generator=gen, device=device))
        graph.replay()
        errs += errors(ids, x, res, logits)
    return all_sent, max(errs)


def test_one_shot_all_reduce_matches_nccl():
    os.environ.setdefault("TPSERVE_ALLREDUCE", "auto")
    world = 2
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(rank_main, args=(world, free_port(), results), nprocs=world)
        results = dict(results)
    for rank in range(world):
        used, err, fused_err, (all_sent, sent_err), (vocab_sent, vocab_err) = results[rank]
        assert used, "the one-shot path was not set up on a 2-GPU machine"
        # both sum two bf16 values in float and round once: they may differ by one ulp
        assert err <= 2 ** -6 * 8, f"rank {rank}: max error {err}"
        # normalized values are O(1): one bf16 ulp of them, at most
        assert fused_err <= 2 ** -6, f"rank {rank}: joined kernel off by {fused_err}"
        assert all_sent, f"rank {rank}: a one-row GEMV did not send its partial sums"
        assert sent_err <= 2 ** -6, f"rank {rank}: sent partial sums off by {sent_err}"
        assert vocab_sent, f"rank {rank}: a one-row embedding or LM head did not send its row"
        # residual and logits exact; the norm as the separate kernel's, within an ulp
        assert vocab_err <= 2 ** -6, f"rank {rank}: embedding or gathered logits off by {vocab_err}"
