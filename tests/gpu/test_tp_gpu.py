"""tp=2 over NCCL (two Ray actors, one GPU each) decodes the same greedy tokens as tp=1
on a random Llama of moderate size (GQA, vocab not a multiple of the tp split)."""
from __future__ import annotations

import functools
import time

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
    pytest.skip("needs 2 CUDA devices", allow_module_level=True)

ray = pytest.importorskip("ray")

from tpserve.engine.config import EngineConfig  # noqa: E402
from tpserve.engine.convert import convert  # noqa: E402
from tpserve.engine.forward_batch import ForwardBatch  # noqa: E402
from tpserve.engine.model_runner import ModelRunner  # noqa: E402
from tpserve.engine.workspace import read_meta  # noqa: E402
from tpserve.parallel.executor import RayExecutor  # noqa: E402

STEPS = 32
PROMPTS = [[1, 17, 923, 4001, 77, 12], [1, 5, 31999, 8], list(range(2, 130))]


def random_llama(folder):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32003, hidden_size=1024, intermediate_size=2816,
                      num_hidden_layers=6, num_attention_heads=16, num_key_value_heads=4,
                      max_position_embeddings=2048, torch_dtype="float32")
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    model.save_pretrained(folder)
    return folder


def greedy(runner) -> tuple[torch.Tensor, list[list[int]]]:
    bs = runner.block_size
    per_seq = -(-(max(map(len, PROMPTS)) + STEPS) // bs)
    tables = [[b * per_seq + i for i in range(per_seq)] for b in range(len(PROMPTS))]
    logits = runner.execute(ForwardBatch.build(PROMPTS, [0] * len(PROMPTS), tables, bs))
    first, tokens = logits.float().cpu(), [[] for _ in PROMPTS]
    for step in range(STEPS):
        nxt = logits.argmax(-1).tolist()
        for out, t in zip(tokens, nxt):
            out.append(t)
        ctx = [len(p) + step for p in PROMPTS]
        logits = runner.execute(ForwardBatch.build([[t] for t in nxt], ctx, tables, bs))
    return first, tokens


def test_tp2_nccl_greedy_equals_tp1(tmp_path):
    src = random_llama(tmp_path / "hf")
    config = EngineConfig(cache_max_entry_count=64, cache_block_seq_len=64, dtype="float32",
                          device="cuda")
    ws1 = convert("llama2", src, tmp_path / "ws1", tp=1, progress=False)
    ws2 = convert("llama2", src, tmp_path / "ws2", tp=2, progress=False)
    ref_logits, ref_tokens = greedy(ModelRunner(ws1, read_meta(ws1), config))
    torch.cuda.empty_cache()
    if not ray.is_initialized():
        ray.init(num_cpus=4, num_gpus=2, include_dashboard=False)
    start = time.perf_counter()
    ex = RayExecutor(2, functools.partial(ModelRunner, ws2, read_meta(ws2), config), device="cuda")
    print(f"tp=2 start {time.perf_counter() - start:.1f} s on {torch.cuda.get_device_name()}")
    try:
        logits, tokens = greedy(ex)
        torch.testing.assert_close(logits, ref_logits, rtol=1e-3,
                                   atol=1e-3 * float(ref_logits.abs().max()))
        assert tokens == ref_tokens
        batch = ForwardBatch.build([[5]], [10], [[0]], ex.block_size)
        ex.execute(batch)
        start = time.perf_counter()
        for _ in range(50):
            ex.execute(batch)
        print(f"tp=2 decode step (1 seq): {(time.perf_counter() - start) / 50 * 1e3:.2f} ms")
    finally:
        ex.shutdown()
