"""The forward in pieces around attention (what CUDA graphs capture for steps that
are not pure decodes), run on CPU without capture: padded to a bucket, it gives the
eager forward's logits and writes no KV for its padding rows."""
from __future__ import annotations

import pytest
import torch

from conftest import ENGINE_OPTIONS
from tpserve.engine.config import EngineConfig
from tpserve.engine.forward_batch import ForwardBatch
from tpserve.engine.mixed_graphs import MixedGraphs, bucket_sizes
from tpserve.engine.model_runner import ModelRunner
from tpserve.engine.workspace import read_meta


def test_bucket_sizes():
    sizes = bucket_sizes(2048)
    assert sizes[:5] == [16, 32, 48, 64, 96] and sizes[-3:] == [1536, 1792, 2048]
    steps = [b - a for a, b in zip(sizes, sizes[1:])]
    assert all(s > 0 for s in steps) and all(b / a <= 1.5 for a, b in zip(sizes[1:], sizes[2:]))
    assert bucket_sizes(100) == [16, 32, 48, 64, 96, 100]
    assert bucket_sizes(16) == [16]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_pieces_equal_eager_forward(family, tiny_workspace):
    ws = tiny_workspace(family)
    runner = ModelRunner(ws, read_meta(ws), EngineConfig(**ENGINE_OPTIONS))
    g = torch.Generator().manual_seed(4)
    lens = [9, 30, 3, 17]
    tables = [[4 * b + 1, 4 * b + 2, 4 * b + 3, 4 * b + 4] for b in range(len(lens))]
    ids = [torch.randint(2, 256, (n + 12,), generator=g).tolist() for n in lens]
    with torch.inference_mode():
        runner.execute(ForwardBatch.build([x[:n] for x, n in zip(ids, lens)], [0] * len(lens),
                                          tables, runner.block_size))
        # two decodes, then prompt chunks of 12 and 7 tokens: 21 tokens, padded to 32
        new = [ids[0][9:10], ids[1][30:31], ids[2][3:15], ids[3][17:24]]
        batch = ForwardBatch.build(new, lens, tables, runner.block_size,
                                   want_logits=[True, True, True, False])
        kv = runner.kv_cache
        pieces = MixedGraphs(runner.model, kv, runner.device, runner.dtype, 64, capture=False)
        # stale inputs in the padding rows (an earlier step's) must not matter
        pieces.positions.fill_(5)
        pieces.slot_mapping.fill_(20 * runner.block_size)
        before = kv.k.clone()  # [layers, blocks, block size, kv heads, head dim]
        got = runner.model.compute_logits(pieces.run(batch)[batch.logits_indices])
        written = [set(layer.nonzero().flatten().tolist())
                   for layer in (kv.k != before).any(dim=(2, 3, 4))]
        want = runner.execute(batch)
    assert got.shape == want.shape == (3, runner.vocab_size)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # exactly the blocks of the step's real tokens changed (padding rows have slot -1)
    assert written == [{1, 6, 9, 14}] * len(written)


def test_running_out_of_memory_while_capturing_says_what_to_change():
    from tpserve.engine.errors import ConfigError
    from tpserve.engine.model_runner import explain_capture_oom

    config = EngineConfig(cache_max_entry_count=0.97)
    with pytest.raises(ConfigError, match=r"0\.97.*--cache-max-entry-count.*--eager-mode"):
        with explain_capture_oom(config):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    with pytest.raises(ValueError):  # anything else passes through
        with explain_capture_oom(config):
            raise ValueError("not memory")
