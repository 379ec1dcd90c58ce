"""Tensor parallelism over gloo with Ray actors: tp=2 (and tp=4) logits and greedy
tokens equal tp=1's and transformers'; a killed rank fails the next step fast."""
from __future__ import annotations

import functools
import os
import time

import pytest
import ray
import torch
from conftest import ENGINE_OPTIONS, local_ray
from engine_scenarios import runner_greedy

from tpserve.engine.config import EngineConfig
from tpserve.engine.forward_batch import ForwardBatch
from tpserve.engine.model_runner import ModelRunner
from tpserve.engine.workspace import read_meta
from tpserve.parallel.executor import ExecutorDeadError, PlacementError, RayExecutor

PROMPTS = [[0, 5, 9, 22, 7, 3, 41, 17, 250], [0, 4, 88], [0, 130, 12, 61, 200]]
STEPS = 16
CONFIG = EngineConfig(**ENGINE_OPTIONS)


@pytest.fixture(scope="module")
def ray_cluster():
    with local_ray(6):  # tp=2 kept alive + tp=4
        yield


@pytest.fixture(scope="module")
def llama_llm(ray_cluster, tiny_workspace):
    """LLM over the tiny llama at tp=2 (2 KV heads: one per rank); its executor is a RayExecutor.
    Module-scoped: rank processes take seconds to start, and the last test kills one."""
    from tpserve.engine.llm import LLM

    llm = LLM(tiny_workspace("llama", 2), tp=2, **ENGINE_OPTIONS)
    yield llm
    llm.shutdown()


def executor(workspace, tp: int, **kwargs) -> RayExecutor:
    factory = functools.partial(ModelRunner, workspace, read_meta(workspace), CONFIG)
    return RayExecutor(tp, factory, device="cpu", **kwargs)


def greedy(runner, prompts=PROMPTS, steps=STEPS) -> tuple[torch.Tensor, list[list[int]]]:
    return runner_greedy(runner, prompts, steps)


def hf_greedy(model, prompts=PROMPTS, steps=STEPS) -> tuple[torch.Tensor, list[list[int]]]:
    last, tokens = [], []
    for prompt in prompts:
        ids = list(prompt)
        for step in range(steps):
            logits = model(torch.tensor([ids])).logits[0, -1]
            if step == 0:
                last.append(logits)
            ids.append(int(logits.argmax()))
        tokens.append(ids[len(prompt):])
    return torch.stack(last), tokens


def assert_logits_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    torch.testing.assert_close(actual, expected.float(), rtol=rtol,
                               atol=rtol * float(expected.abs().max()))


def check_family(family: str, runner, tiny_workspace, tiny_hf) -> list[list[int]]:
    logits, tokens = greedy(runner)
    ref_logits, ref_tokens = greedy(ModelRunner(tiny_workspace(family, 1),
                                                read_meta(tiny_workspace(family, 1)), CONFIG))
    assert runner.vocab_size == ref_logits.shape[-1]
    assert_logits_close(logits, ref_logits, rtol=1e-5)
    assert tokens == ref_tokens
    hf_logits, hf_tokens = hf_greedy(tiny_hf(family)[1])
    assert_logits_close(logits, hf_logits, rtol=1e-4)
    assert tokens == hf_tokens
    return tokens


def test_llama_tp2_matches_tp1_and_transformers(llama_llm, tiny_workspace, tiny_hf):
    ex = llama_llm.executor
    assert isinstance(ex, RayExecutor) and ex.tp == 2
    assert ex.num_blocks == ENGINE_OPTIONS["cache_max_entry_count"]
    check_family("llama", ex, tiny_workspace, tiny_hf)


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_llm_generate_tp2_greedy_equals_direct_decoding(llama_llm, tiny_hf, monkeypatch,
                                                        async_scheduling):
    """With async scheduling, rank 0 gets step t+1 before step t's answer is read, and
    feeds the pending tokens (broadcast to rank 1) from its own samples."""
    from tpserve.engine.sampling_params import SamplingParams

    engine = llama_llm.engine
    monkeypatch.setattr(engine, "config", engine.config.replace(async_scheduling=async_scheduling))
    ahead = []
    begin = engine.begin_step
    monkeypatch.setattr(engine, "begin_step",
                        lambda after=None: ahead.append(after is not None) or begin(after))
    params = SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True)
    outs = llama_llm.generate(PROMPTS, params)
    assert [o.token_ids for o in outs] == hf_greedy(tiny_hf("llama")[1])[1]
    # every step after the prefill was scheduled ahead, and one more (empty: max_tokens)
    assert sum(ahead) == (STEPS if async_scheduling else 0)


def test_qwen2_tp2_in_the_callers_placement_group(ray_cluster, tiny_workspace, tiny_hf):
    from ray.util.placement_group import placement_group, placement_group_table

    pg = placement_group([{"CPU": 1}] * 2, strategy="STRICT_PACK")
    ray.get(pg.ready(), timeout=60)
    ex = executor(tiny_workspace("qwen2", 2), 2, placement_group=pg)
    try:
        check_family("qwen2", ex, tiny_workspace, tiny_hf)
    finally:
        ex.shutdown()
    assert placement_group_table(pg)["state"] == "CREATED"  # the caller's: left in place
    ray.util.remove_placement_group(pg)


@pytest.mark.slow
@pytest.mark.skipif((os.cpu_count() or 1) < 4,
                    reason="4 rank processes take ~30 s to start on fewer than 4 cores")
def test_llama_tp4_replicates_kv_heads(ray_cluster, tiny_workspace, tiny_hf):
    ex = executor(tiny_workspace("llama", 4), 4)
    try:
        check_family("llama", ex, tiny_workspace, tiny_hf)
    finally:
        ex.shutdown()


def test_placement_error_names_resources(ray_cluster):
    with pytest.raises(PlacementError, match=r"16 x \{'CPU': 1\}.*available"):
        RayExecutor(16, lambda rank, group: None, device="cpu", placement_timeout_s=1)


def test_tp2_streams_with_stops_and_aborts_under_async_scheduling(llama_llm, tiny_hf):
    """Concurrent streams through the async engine over tp=2: rank 0 gets each step before
    the last one's answer is read. Full streams equal transformers' greedy tokens, a stop
    token ends its stream there, an abandoned stream frees its blocks."""
    import asyncio

    from tpserve.engine.sampling_params import SamplingParams

    ref = hf_greedy(tiny_hf("llama")[1])[1]
    stop = ref[0][4]

    async def tokens(engine, prompt, params, rid, keep=None):
        got = []
        stream = engine.generate(prompt, params, rid)
        async for out in stream:
            got = list(out.token_ids)
            if keep is not None and len(got) >= keep:
                break
        await stream.aclose()
        return got

    async def main():
        engine = llama_llm.async_engine()
        full = SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True)
        stopping = SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True,
                                  stop_token_ids=[stop])
        results = await asyncio.gather(
            *(tokens(engine, p, full, f"full{i}") for i, p in enumerate(PROMPTS)),
            tokens(engine, PROMPTS[0], stopping, "stop"),
            tokens(engine, PROMPTS[1], full, "left", keep=3))
        assert results[:3] == ref
        assert results[3] == ref[0][:ref[0].index(stop) + 1]
        assert results[4] == ref[1][:len(results[4])] and len(results[4]) >= 3
        for _ in range(100):  # the abandoned stream's abort reaches the engine thread
            stats = await engine.stats()
            if stats["running"] == 0:
                break
            await asyncio.sleep(0.01)
        assert stats["running"] == 0 and stats["kv_cache_usage"] == 0.0
        engine.shutdown()

    asyncio.run(main())


def test_tp2_feeds_samples_of_every_rank_and_of_rank0_alike(llama_llm, tiny_hf, monkeypatch):
    """Under async scheduling a step whose sampling is a plain argmax is sampled by every
    rank, and the next step feeds on the tokens each rank holds (no broadcast); a step
    with a sampled request is sampled by rank 0, which broadcasts them. A greedy stream
    joined midway by a seeded sampled one goes from the first kind to the second and
    back: its tokens stay transformers' greedy ones, and the sampled stream's equal the
    same request run alone, one step at a time."""
    import asyncio

    from tpserve.engine.async_engine import AsyncLLMEngine
    from tpserve.engine.forward_batch import (SAMPLED_BY_ALL, SAMPLED_BY_NONE, SAMPLED_BY_RANK0,
                                              mark_sampler)
    from tpserve.engine.sampling_params import SamplingParams

    ref = hf_greedy(tiny_hf("llama")[1])[1]
    greedy = SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True)
    sampled = SamplingParams(temperature=0.9, seed=7, max_tokens=4, ignore_eos=True)
    engine = llama_llm.engine
    sync = engine.config.replace(async_scheduling=False)
    monkeypatch.setattr(engine, "config", sync)
    alone = llama_llm.generate([PROMPTS[1]], sampled)[0].token_ids
    monkeypatch.setattr(engine, "config", sync.replace(async_scheduling=True))
    marks = []  # who samples each step, as rank 0 marks it
    original = engine.runner.submit_step

    def submit(batch, sampling):
        marks.append(mark_sampler(batch, sampling).sampled_by)
        return original(batch, sampling)
    monkeypatch.setattr(engine.runner, "submit_step", submit)

    async def tokens(async_engine, prompt, params, rid, started=None, after=None):
        if after is not None:
            await after.wait()
        got = []
        async for out in async_engine.generate(prompt, params, rid):
            got = list(out.token_ids)
            if started is not None and len(got) >= 3:
                started.set()
        return got

    async def main():
        async_engine = AsyncLLMEngine(engine)  # its own: an earlier test shut the LLM's down
        started = asyncio.Event()
        results = await asyncio.gather(tokens(async_engine, PROMPTS[0], greedy, "g", started),
                                       tokens(async_engine, PROMPTS[1], sampled, "s",
                                              after=started))
        async_engine.shutdown()
        return results

    got_greedy, got_sampled = asyncio.run(main())
    assert got_greedy == ref[0]
    assert got_sampled == alone
    # both kinds of step ran, and the greedy-only steps came before and after the others
    kinds = [m for m in marks if m != SAMPLED_BY_NONE]
    first = kinds.index(SAMPLED_BY_RANK0)
    last = len(kinds) - 1 - kinds[::-1].index(SAMPLED_BY_RANK0)
    assert SAMPLED_BY_ALL in kinds[:first] and SAMPLED_BY_ALL in kinds[last + 1:]


def test_killed_rank_fails_the_next_step_fast(llama_llm):
    ex = llama_llm.executor
    ex.check_health()
    batch = ForwardBatch.build([[0, 5, 9]], [0], [[0]], ex.block_size)
    ray.kill(ex.workers[1], no_restart=True)
    start = time.monotonic()
    # ray.kill returns before the process is gone, so a step sent at once may still
    # run on both ranks; the steps after the death must fail, and soon
    with pytest.raises(ExecutorDeadError, match="rank"):
        for _ in range(100):
            ex.execute(batch)
            time.sleep(0.05)
    assert time.monotonic() - start < 30
    with pytest.raises(ExecutorDeadError):
        ex.check_health()


@pytest.mark.parametrize("visible, gpu_id, index", [
    ("2,3", "3", 1),    # the node's list narrowed by whoever started Ray
    (None, 1, 1),       # all GPUs visible: Ray's id is the index
    ("GPU-aa,GPU-bb", "GPU-bb", 1),
    ("5", "5", 0),      # a Ray that narrowed the list to this actor's GPU anyway
])
def test_local_gpu_index(monkeypatch, visible, gpu_id, index):
    from tpserve.parallel import worker

    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [gpu_id])
    assert worker.local_gpu_index() == index


def test_local_gpu_index_refuses_a_gpu_it_cannot_place(monkeypatch):
    from tpserve.parallel import worker

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: ["3"])
    with pytest.raises(RuntimeError, match="not in this node's CUDA_VISIBLE_DEVICES=0,1"):
        worker.local_gpu_index()
