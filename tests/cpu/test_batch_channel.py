"""The step channels: rank 1 receives exactly what rank 0 sent, over shared memory
(ranks on one host) and over gloo, for a decode step, a prefill too long for one
gloo message, and a prefill longer than one shared-memory slot."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tpserve.engine.forward_batch import ForwardBatch
from tpserve.parallel import batch_channel


def _batches():
    decode = ForwardBatch.build([[5], [9], [11]], [10, 70, 3], [[0], [1, 2], [3]], 64)
    long_prompt = list(range(3000))  # 3 x 3000 ints: too long for one gloo message
    prefill = ForwardBatch.build([long_prompt, [4, 2]], [0, 5], [list(range(47)), [50]], 64)
    huge = ForwardBatch.build([list(range(200_000))], [0], [list(range(3200))], 64)  # > 1 MiB
    fed = ForwardBatch.build([[5], [0], [0]], [10, 70, 3], [[0], [1, 2], [3]], 64,
                             fed_rows=[-1, 2, 0])  # async scheduling: two pending tokens
    assert fed.fed_rows.tolist() == [-1, 2, 0]
    mixed = ForwardBatch.build([[5], [9], [4, 2, 7], [1]], [10, 70, 0, 3],
                               [[0], [1, 2], [4], [3]], 64)
    # the leading one-token requests, which attention runs as decodes
    assert (decode.num_decodes, prefill.num_decodes, mixed.num_decodes) == (3, 0, 2)
    return [decode, prefill, huge, fed, mixed, decode]


def _same(a, b) -> bool:
    ok = type(a) is type(b)
    for key, value in b.__dict__.items():
        other = getattr(a, key)
        if isinstance(value, torch.Tensor):
            ok &= other.dtype == value.dtype and torch.equal(other, value)
        else:
            ok &= other == value
    return ok


def _rank(rank: int, port: int, mode: str, result) -> None:
    os.environ[batch_channel.STEP_CHANNEL_ENV] = mode
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=3)
    channel = batch_channel.open_batch_channel()
    kind = type(channel).__name__
    if rank == 0:
        for batch in _batches():
            channel.send(batch)
        channel.stop()
    else:
        got = []
        while (batch := channel.recv()) is not None:
            got.append(batch)
        ok = len(got) == len(_batches()) and all(_same(a, b) for a, b in zip(got, _batches()))
        result.put((rank, kind, ok))
    dist.destroy_process_group()


@pytest.mark.parametrize("mode, kind", [("auto", "ShmBatchChannel"), ("gloo", "GlooBatchChannel")])
def test_batches_arrive_unchanged(mode, kind):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    result = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, port, mode, result)) for r in range(3)]
    for p in procs:
        p.start()
    got = sorted(result.get(timeout=120) for _ in range(2))
    for p in procs:
        p.join(30)
    assert got == [(1, kind, True), (2, kind, True)]
    assert all(p.exitcode == 0 for p in procs)
