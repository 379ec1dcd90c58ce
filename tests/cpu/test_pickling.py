"""The per-step dataclasses survive pickling (as Ray ships them) unchanged."""
import pickle

import torch

from tpserve.engine.forward_batch import ForwardBatch
from tpserve.engine.request import Request
from tpserve.engine.sampler import SamplerOutput, SamplingBatch
from tpserve.engine.sampling_params import SamplingParams


def _same(a, b):
    assert type(a) is type(b)
    for key, value in a.__dict__.items():
        other = getattr(b, key)
        if isinstance(value, torch.Tensor):
            assert other.dtype == value.dtype and torch.equal(other, value), key
        else:
            assert other == value, key


def test_forward_batch_round_trip():
    batch = ForwardBatch.build([[5, 6, 7], [9]], [0, 40], [[3, 1], [0, 2, 5]], 16, [False, True])
    _same(batch, pickle.loads(pickle.dumps(batch)))


def test_sampling_batch_and_output_round_trip():
    rows = [Request.new("a", [1, 2], SamplingParams(seed=3, top_p=0.5, repetition_penalty=1.1,
                                                    logprobs=2)),
            Request.new("b", [4], SamplingParams())]
    batch = SamplingBatch.build(rows, 10)
    _same(batch, pickle.loads(pickle.dumps(batch)))
    out = SamplerOutput(torch.tensor([3, 4]), torch.tensor([-0.5, -1.0]),
                        torch.tensor([[3, 1], [4, 0]]), torch.tensor([[-0.5, -2.0], [-1.0, -3.0]]))
    _same(out, pickle.loads(pickle.dumps(out)))
    _same(SamplerOutput(torch.tensor([1])), pickle.loads(pickle.dumps(SamplerOutput(torch.tensor([1])))))
