"""tp=2 and tp=4 over NCCL (one Ray actor per GPU) decode the same greedy tokens as
tp=1 on a random Llama in Llama-3-8B's widths (two layers), with decode steps
replayed as CUDA graphs on every rank."""
from __future__ import annotations

import functools
import time

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
    pytest.skip("needs 2 CUDA devices", allow_module_level=True)

ray = pytest.importorskip("ray")

from engine_scenarios import runner_greedy  # noqa: E402
from tpserve.engine.config import EngineConfig  # noqa: E402
from tpserve.engine.convert import convert  # noqa: E402
from tpserve.engine.forward_batch import ForwardBatch  # noqa: E402
from tpserve.engine.model_runner import ModelRunner  # noqa: E402
from tpserve.engine.workspace import read_meta  # noqa: E402
from tpserve.parallel.executor import RayExecutor  # noqa: E402

STEPS = 32
PROMPTS = [[1, 17, 923, 4001, 77, 12], [1, 5, 128255, 8], list(range(2, 130))]


def random_llama(folder):
    """Llama-3-8B's widths (hidden, heads, GQA, intermediate, vocab) with two layers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=2, num_attention_heads=32, num_key_value_heads=8,
                      max_position_embeddings=2048, rope_theta=500000.0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).float()
    model.save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    return folder


def greedy(runner) -> tuple[torch.Tensor, list[list[int]]]:
    return runner_greedy(runner, PROMPTS, STEPS)


def engine_greedy(executor, async_scheduling: bool) -> list[list[int]]:
    """STEPS greedy tokens per prompt through an LLMEngine over the executor."""
    from tpserve.engine.llm_engine import LLMEngine
    from tpserve.engine.sampling_params import SamplingParams

    engine = LLMEngine(executor, None, CONFIG.replace(async_scheduling=async_scheduling))
    params = SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(str(i), prompt, params)
    final = {o.request_id: o.token_ids for outputs in engine.steps() for o in outputs
             if o.finished}
    return [final[str(i)] for i in range(len(PROMPTS))]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tp")
    src = random_llama(tmp / "hf")
    ws1 = convert("llama2", src, tmp / "ws1", tp=1, progress=False)
    runner = ModelRunner(ws1, read_meta(ws1), CONFIG)
    result = greedy(runner)
    del runner
    torch.cuda.empty_cache()
    return src, tmp, result


CONFIG = EngineConfig(cache_max_entry_count=64, cache_block_seq_len=64, dtype="float32",
                      device="cuda", max_batch_size=8)


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_nccl_greedy_equals_tp1(tp, reference):
    if torch.cuda.device_count() < tp:
        pytest.skip(f"needs {tp} CUDA devices")
    src, tmp, (ref_logits, ref_tokens) = reference
    ws = convert("llama2", src, tmp / f"ws{tp}", tp=tp, progress=False)
    if not ray.is_initialized():
        ray.init(num_cpus=8, num_gpus=torch.cuda.device_count(), include_dashboard=False)
    start = time.perf_counter()
    ex = RayExecutor(tp, functools.partial(ModelRunner, ws, read_meta(ws), CONFIG), device="cuda")
    print(f"tp={tp} start {time.perf_counter() - start:.1f} s on {torch.cuda.get_device_name()}")
    try:
        logits, tokens = greedy(ex)
        torch.testing.assert_close(logits, ref_logits, rtol=1e-3,
                                   atol=1e-3 * float(ref_logits.abs().max()))
        assert tokens == ref_tokens
        for async_scheduling in (True, False):  # rank 0 feeds and broadcasts pending tokens
            assert engine_greedy(ex, async_scheduling) == ref_tokens, async_scheduling
        batch = ForwardBatch.build([[5]], [10], [[0]], ex.block_size)
        ex.execute(batch)
        start = time.perf_counter()
        for _ in range(50):
            ex.execute(batch)
        print(f"tp={tp} decode step (1 seq): {(time.perf_counter() - start) / 50 * 1e3:.2f} ms")
    finally:
        ex.shutdown()
