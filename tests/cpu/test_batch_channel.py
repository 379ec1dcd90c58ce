"""BatchChannel over gloo: rank 1 receives exactly what rank 0 sent, for a decode
step that fits the one-message path and a prefill that needs a second broadcast."""
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tpserve.engine.forward_batch import ForwardBatch
from tpserve.parallel.process_group import BatchChannel


def _batches():
    decode = ForwardBatch.build([[5], [9], [11]], [10, 70, 3], [[0], [1, 2], [3]], 64)
    long_prompt = list(range(3000))  # 3 x 3000 ints: too long for one message
    prefill = ForwardBatch.build([long_prompt, [4, 2]], [0, 5], [list(range(47)), [50]], 64)
    return [decode, prefill, decode]


def _rank(rank: int, port: int, result) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    channel = BatchChannel()
    if rank == 0:
        for batch in _batches():
            channel.send(batch)
        channel.stop()
    else:
        got = []
        while (batch := channel.recv()) is not None:
            got.append(batch)
        ok = len(got) == 3
        for a, b in zip(got, _batches()):
            for key, value in b.__dict__.items():
                other = getattr(a, key)
                if isinstance(value, torch.Tensor):
                    ok &= other.dtype == value.dtype and torch.equal(other, value)
                else:
                    ok &= other == value
        result.put(ok)
    dist.destroy_process_group()


def test_batches_arrive_unchanged():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    result = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, port, result)) for r in (0, 1)]
    for p in procs:
        p.start()
    ok = result.get(timeout=60)
    for p in procs:
        p.join(30)
    assert ok
    assert all(p.exitcode == 0 for p in procs)
