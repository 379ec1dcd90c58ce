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


def forced_decode_logits(runner, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """Logits [1 + len(tokens), vocab] of one sequence: its prompt, then one given token a
    step (batch 1: the one-row GEMVs, and at tp > 1 the ones that send their rows)."""
    bs = runner.block_size
    table = [list(range(-(-(len(prompt) + len(tokens)) // bs)))]
    # copied at once: a runner replaying CUDA graphs returns its graph's output buffer
    out = [runner.execute(ForwardBatch.build([prompt], [0], table, bs)).float().cpu().clone()]
    for step, t in enumerate(tokens):
        batch = ForwardBatch.build([[t]], [len(prompt) + step], table, bs)
        out.append(runner.execute(batch).float().cpu().clone())
    return torch.cat(out)


def test_tp2_bf16_one_sequence_close_to_tp1(reference):
    """bf16 at batch 1, CUDA graphs: tp=2's logits (row-parallel GEMVs sending their
    partial sums, the all-reduce joined with the norm) within bf16 rounding of tp=1's."""
    src, tmp, (_, ref_tokens) = reference
    prompt, tokens = PROMPTS[0], ref_tokens[0][:16]
    config = CONFIG.replace(dtype="bfloat16")
    ws1, ws2 = tmp / "ws1", convert("llama2", src, tmp / "ws2bf16", tp=2, progress=False)
    runner = ModelRunner(ws1, read_meta(ws1), config)
    want = forced_decode_logits(runner, prompt, tokens)
    del runner
    torch.cuda.empty_cache()
    if not ray.is_initialized():
        ray.init(num_cpus=8, num_gpus=torch.cuda.device_count(), include_dashboard=False)
    ex = RayExecutor(2, functools.partial(ModelRunner, ws2, read_meta(ws2), config),
                     device="cuda")
    try:
        got = forced_decode_logits(ex, prompt, tokens)
    finally:
        ex.shutdown()
    scale = float(want.abs().max())
    err = (got - want).abs()
    print(f"tp=2 bf16 vs tp=1: max {err.max() / scale:.2e}, mean {err.mean() / scale:.2e} "
          f"of the largest logit")
    assert err.max() <= 3e-2 * scale and err.mean() <= 5e-3 * scale
