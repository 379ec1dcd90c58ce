"""LLMEngine and AsyncLLMEngine driven by a fake model runner.

The fake keeps a "KV cache" of token ids: each step writes the new tokens at
their slots, then reads every sequence's whole context back through its block
table. Its next token is a hash of that context, so a wrong block table,
slot, prefix hit or recompute after preemption changes the output. Like a
model runner, it keeps its last sampled tokens and feeds a batch's pending
tokens (async scheduling) from them. Every test runs with async scheduling
on (`LLMEngine.steps`) and off (one `step()` at a time).
"""
import asyncio
import dataclasses
import random
import time

import pytest
import torch

from tpserve.engine.async_engine import AsyncLLMEngine, EngineDeadError
from tpserve.engine.config import EngineConfig
from tpserve.engine.errors import RequestError
from tpserve.engine.llm_engine import LLMEngine
from tpserve.engine.model_runner import Launched
from tpserve.engine.sampler import sample
from tpserve.engine.sampling_params import SamplingParams

V = 97
BS = 4


def next_token(context):
    return (sum((i + 1) * t for i, t in enumerate(context)) * 31 + len(context)) % V


def reference(prompt, max_tokens, stop_ids=()):
    tokens, out = list(prompt), []
    for _ in range(max_tokens):
        out.append(next_token(tokens))
        tokens.append(out[-1])
        if out[-1] in stop_ids:
            break
    return out


class FakeRunner:
    def __init__(self, num_blocks=64, delay=0.0):
        self.block_size, self.num_blocks, self.vocab_size = BS, num_blocks, V
        self.device = torch.device("cpu")
        self.cache = torch.full((num_blocks * BS,), -1, dtype=torch.int64)
        self.delay = delay
        self.fail = False
        self.num_steps = 0
        self.num_fed = 0  # tokens taken from the last step's samples
        self.last_sampled = None
        self.next_token = next_token  # the model: context -> greedy token

    def execute(self, batch):
        if self.fail:
            raise RuntimeError("device lost")
        time.sleep(self.delay)
        self.num_steps += 1
        if batch.fed_rows is not None:
            rows = batch.fed_rows
            fed = self.last_sampled[rows.clamp(min=0)]
            batch = dataclasses.replace(batch, input_ids=torch.where(rows >= 0, fed, batch.input_ids))
            self.num_fed += int((rows >= 0).sum())
        self.cache[batch.slot_mapping] = batch.input_ids
        qsl, wanted = batch.query_start_loc.tolist(), set(batch.logits_indices.tolist())
        rows = []
        for b in range(batch.num_seqs):
            assert batch.positions[qsl[b + 1] - 1] == batch.seq_lens[b] - 1
            if qsl[b + 1] - 1 in wanted:
                table, n = batch.block_tables[b].tolist(), int(batch.seq_lens[b])
                context = self.cache[[table[p // BS] * BS + p % BS for p in range(n)]].tolist()
                rows.append(self.next_token(context))
        logits = torch.full((len(rows), V), -5.0)
        chosen = torch.tensor(rows, dtype=torch.int64)
        logits[torch.arange(len(rows)), (chosen + 1) % V] = 4.0  # a runner-up for penalties
        logits[torch.arange(len(rows)), chosen] = 5.0
        return logits

    def step(self, batch, sampling):
        logits = self.execute(batch)
        if sampling is None:
            return None
        sampled = sample(logits, sampling.fill_pending(self.last_sampled))
        self.last_sampled = sampled.token_ids
        return sampled

    def submit_step(self, batch, sampling):
        return Launched(self.step(batch, sampling))


class CharTokenizer:
    """Token t is the letter chr(97 + t % 26); enough for stop-string plumbing."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + t % 26) for t in ids)


ASYNC = {"async_scheduling": True}


@pytest.fixture(autouse=True, params=[True, False], ids=["async", "sync"])
def scheduling(request):
    ASYNC["async_scheduling"] = request.param
    yield request.param


def make_engine(num_blocks=64, tokenizer=None, eos=(), delay=0.0, **config):
    config = EngineConfig(cache_block_seq_len=BS, **{**ASYNC, **config})
    return LLMEngine(FakeRunner(num_blocks, delay), tokenizer, config, eos)


def greedy(max_tokens, **kw):
    return SamplingParams(temperature=0, max_tokens=max_tokens, **kw)


def run(engine, limit=10_000):
    """Every output by request id, from `steps()` (async scheduling when the config has it)."""
    results = {}
    for i, outputs in enumerate(engine.steps()):
        assert i < limit, "engine did not finish"
        for out in outputs:
            results.setdefault(out.request_id, []).append(out)
    return results


def assert_idle(engine):
    assert not engine.has_unfinished()
    assert engine.pool.num_free_blocks == engine.pool.num_blocks


def test_single_request_matches_reference():
    engine = make_engine()
    prompt = [5, 17, 3, 40, 2, 9]
    engine.add_request("a", prompt, greedy(10))
    outs = run(engine)["a"]
    assert [o.delta_token_ids[0] for o in outs] == reference(prompt, 10)
    assert outs[-1].token_ids == reference(prompt, 10) and outs[-1].finish_reason == "length"
    assert outs[-1].prompt_token_ids == prompt
    assert_idle(engine)


def test_continuous_batching_with_chunked_prefill():
    rng = random.Random(3)
    engine = make_engine(max_prefill_tokens=16, max_batch_size=5)
    expected, results, added = {}, {}, 0
    while added < 14 or engine.has_unfinished():
        if added < 14 and rng.random() < 0.5:
            prompt = [rng.randrange(V) for _ in range(rng.randrange(1, 30))]
            max_tokens = rng.randrange(1, 15)
            engine.add_request(f"r{added}", prompt, greedy(max_tokens))
            expected[f"r{added}"] = reference(prompt, max_tokens)
            added += 1
        for out in engine.step():
            results[out.request_id] = out
    assert {rid: o.token_ids for rid, o in results.items()} == expected
    assert engine.stats().generation_tokens_total == sum(map(len, expected.values()))
    assert_idle(engine)


def test_preemption_recomputes_to_the_same_tokens():
    engine = make_engine(num_blocks=12)  # 48 token slots for 4 x 25 tokens
    prompts = {f"r{i}": [i * 7 + j for j in range(10)] for i in range(4)}
    for rid, prompt in prompts.items():
        engine.add_request(rid, prompt, greedy(15))
    results = run(engine)
    assert engine.stats().num_preemptions > 0
    for rid, prompt in prompts.items():
        assert results[rid][-1].token_ids == reference(prompt, 15)
    assert_idle(engine)


def test_seeded_sampling_ignores_batch_and_preemption():
    params = SamplingParams(temperature=50.0, top_k=40, max_tokens=15, seed=11)
    alone = make_engine()
    alone.add_request("x", [1, 2, 3], params)
    want = run(alone)["x"][-1].token_ids
    crowded = make_engine(num_blocks=12)
    for i in range(3):
        crowded.add_request(f"o{i}", [i + 5] * 10, greedy(15))
    crowded.add_request("x", [1, 2, 3], params)
    got = run(crowded)["x"][-1].token_ids
    assert crowded.stats().num_preemptions > 0
    assert got == want


def test_prefix_hits_share_blocks_and_keep_outputs_exact():
    engine = make_engine()
    shared = list(range(10, 27))  # 17 tokens: 4 full blocks
    engine.add_request("first", shared + [1, 2], greedy(5))
    run(engine)
    engine.add_request("second", shared + [3], greedy(5))
    engine.add_request("third", shared + [4, 5, 6], greedy(5))
    results = run(engine)
    assert results["second"][-1].num_cached_tokens == 16
    assert results["third"][-1].num_cached_tokens == 16
    assert results["second"][-1].token_ids == reference(shared + [3], 5)
    assert results["third"][-1].token_ids == reference(shared + [4, 5, 6], 5)
    stats = engine.stats()
    assert stats.prefix_cache_hits == 32 and stats.prefix_cache_hit_rate > 0.5
    assert_idle(engine)


def test_n_samples_share_the_prompt():
    engine = make_engine()
    prompt = list(range(30, 43))
    engine.add_request("n", prompt, greedy(6, n=3))
    results = run(engine)
    assert sorted(results) == ["n[0]", "n[1]", "n[2]"]
    assert all(r[-1].token_ids == reference(prompt, 6) for r in results.values())
    assert engine.stats().prefix_cache_hits > 0  # the samples after the first reuse its blocks
    engine.add_request("s", prompt, SamplingParams(temperature=50.0, max_tokens=8, seed=1, n=3))
    outs = [r[-1].token_ids for r in run(engine).values()]
    assert len({tuple(o) for o in outs}) == 3
    engine.add_request("s2", prompt, SamplingParams(temperature=50.0, max_tokens=8, seed=1, n=3))
    assert [r[-1].token_ids for r in run(engine).values()] == outs
    assert_idle(engine)


def test_eos_and_stop_token_ids():
    prompt = [1, 2, 3]
    ref = reference(prompt, 20)
    engine = make_engine(eos=[ref[3]])
    engine.add_request("eos", prompt, greedy(20))
    engine.add_request("ignore", prompt, greedy(20, ignore_eos=True))
    engine.add_request("stop_id", prompt, greedy(20, ignore_eos=True, stop_token_ids=[ref[6]]))
    results = run(engine)
    assert results["eos"][-1].token_ids == ref[:ref.index(ref[3]) + 1]
    assert results["eos"][-1].finish_reason == "stop"
    assert results["ignore"][-1].token_ids == ref and results["ignore"][-1].finish_reason == "length"
    assert results["stop_id"][-1].token_ids == ref[:ref.index(ref[6]) + 1]
    assert_idle(engine)


def test_stop_string_through_the_engine():
    prompt = [8, 1, 30]
    text = CharTokenizer().decode(reference(prompt, 20))
    stop = text[5:8]
    engine = make_engine(tokenizer=CharTokenizer())
    engine.add_request("s", prompt, greedy(20, stop=stop, logprobs=2))
    outs = run(engine)["s"]
    assert outs[-1].finish_reason == "stop"
    assert outs[-1].text == "".join(o.delta_text for o in outs) == text[:text.index(stop)]
    assert len(outs[-1].logprobs) == len(outs[-1].token_ids)
    assert all(len(lp.top) == 2 and lp.top[0][0] == lp.token_id for lp in outs[-1].logprobs)
    with pytest.raises(RequestError, match="tokenizer"):
        make_engine().add_request("x", prompt, greedy(3, stop="a"))


def test_each_output_keeps_the_state_of_its_own_step():
    """Outputs read only after the request ended still show their own step's tokens,
    text and logprobs (the engine hands them over as lazy snapshots)."""
    prompt = [8, 1, 30]
    want = reference(prompt, 12)
    text = CharTokenizer().decode(want)
    engine = make_engine(tokenizer=CharTokenizer())
    engine.add_request("r", prompt, greedy(12, logprobs=1))
    outs = run(engine)["r"]  # nothing read until the end
    assert len(outs) == 12
    for i, out in enumerate(outs, start=1):
        assert out.prompt_token_ids == prompt
        assert out.token_ids == want[:i]
        assert [lp.token_id for lp in out.logprobs] == want[:i]
        assert text.startswith(out.text) and len(out.text) <= i
        assert out.delta_token_ids == [want[i - 1]]
    assert outs[-1].text == text
    assert outs[0] != outs[1] and outs[-1] == outs[-1]


def test_session_continues_across_turns():
    engine = make_engine(session_len=40)
    turn1 = [3, 1, 4, 1, 5]
    engine.add_request("t1", turn1, greedy(6), session_id=1, keep_session=True)
    out1 = run(engine)["t1"][-1]
    turn2 = [9, 2, 6]
    engine.add_request("t2", turn2, greedy(6), session_id=1, keep_session=True)
    out2 = run(engine)["t2"][-1]
    assert out2.prompt_token_ids == turn2 and out2.num_cached_tokens == 10
    assert out2.token_ids == reference(turn1 + out1.token_ids + turn2, 6)
    history = turn1 + out1.token_ids + turn2 + out2.token_ids  # 20 tokens
    engine.add_request("t3", [7] * 5, greedy(100), session_id=1, keep_session=True)
    out3 = run(engine)["t3"][-1]
    assert out3.finish_reason == "length" and len(history) + 5 + len(out3.token_ids) == 40
    with pytest.raises(RequestError, match="session_len"):
        engine.add_request("t4", [1], greedy(5), session_id=1)
    assert engine.stats().num_sessions == 1
    engine.end_session(1)
    assert_idle(engine)


def test_evicted_session_recomputes_its_history():
    """Idle sessions give their blocks to new requests when the cache is full; the next
    turn of an evicted session recomputes its history and continues exactly."""
    engine = make_engine(num_blocks=10, session_len=40)
    turns = {1: [3, 1, 4, 1, 5, 9, 2], 2: [2, 7, 1, 8, 2, 8, 1]}
    outs = {}
    for sid, prompt in turns.items():
        engine.add_request(f"a{sid}", prompt, greedy(6), session_id=sid, keep_session=True)
        outs[sid] = run(engine)[f"a{sid}"][-1].token_ids  # 13 tokens: 4 blocks held
    big = [50 + i for i in range(20)]
    engine.add_request("big", big, greedy(4))
    assert run(engine)["big"][-1].token_ids == reference(big, 4)
    assert engine.scheduler.num_session_evictions >= 1
    assert engine.scheduler.sessions[1].block_ids == []  # the least recently used went first
    for sid, prompt in turns.items():
        engine.add_request(f"b{sid}", [6, 6], greedy(5), session_id=sid)
        assert run(engine)[f"b{sid}"][-1].token_ids == reference(prompt + outs[sid] + [6, 6], 5)
    assert_idle(engine)


def test_abort_and_zero_max_tokens():
    engine = make_engine()
    engine.add_request("a", [1, 2, 3], greedy(50))
    engine.add_request("zero", [1, 2, 3], greedy(0))
    first = engine.step()
    zero = next(o for o in first if o.request_id == "zero")
    assert zero.finish_reason == "length" and zero.token_ids == []
    engine.step()
    final = engine.abort_request("a")
    assert [o.finish_reason for o in final] == ["abort"] and len(final[0].token_ids) == 2
    assert engine.abort_request("a") == []
    assert_idle(engine)
    with pytest.raises(RequestError, match="vocabulary"):
        engine.add_request("bad", [V], greedy(1))


def test_random_traffic_with_stops_preemption_and_prefix_hits(scheduling):
    """Requests arriving between steps, ending on stop tokens or max_tokens, in a cache
    small enough to preempt, sharing prefixes: every output equals the reference. With
    async scheduling, pending tokens are fed on the runner and a request that stopped
    loses exactly the one extra token computed for it."""
    rng = random.Random(7)
    stop_ids = {3, 50}
    engine = make_engine(num_blocks=24, max_prefill_tokens=12, max_batch_size=6, eos=[3])
    expected, results, added = {}, {}, 0
    shared = [rng.randrange(V) for _ in range(9)]
    steps = engine.steps()
    while True:
        if added < 24 and rng.random() < 0.6:
            prompt = (shared if rng.random() < 0.5 else []) + \
                [rng.randrange(V) for _ in range(rng.randrange(1, 12))]
            max_tokens = rng.randrange(1, 14)
            engine.add_request(f"r{added}", prompt, greedy(max_tokens, stop_token_ids=[50]))
            expected[f"r{added}"] = reference(prompt, max_tokens, stop_ids)
            added += 1
        try:
            outputs = next(steps)
        except StopIteration:
            if added == 24:
                break
            steps = engine.steps()
            continue
        for out in outputs:
            results[out.request_id] = out
    assert {rid: o.token_ids for rid, o in results.items()} == expected
    assert engine.stats().num_preemptions > 0 and engine.stats().prefix_cache_hits > 0
    assert engine.stats().generation_tokens_total == sum(map(len, expected.values()))
    assert (engine.runner.num_fed > 0) == scheduling
    assert_idle(engine)


def test_async_scheduling_wastes_one_token_per_stop_and_none_per_length(scheduling):
    prompt = [1, 2, 3]
    ref = reference(prompt, 30)
    stopping = make_engine(eos=[ref[4]])
    stopping.add_request("eos", prompt, greedy(30))
    assert run(stopping)["eos"][-1].token_ids == ref[:5]
    # a step per token (the first is the prefill's); async: the step scheduled while the
    # stop token was being sampled also ran
    assert stopping.runner.num_steps == 5 + scheduling
    bounded = make_engine()
    bounded.add_request("len", prompt, greedy(8))
    assert run(bounded)["len"][-1].token_ids == ref[:8]
    assert bounded.runner.num_steps == 8
    assert_idle(stopping)
    assert_idle(bounded)


def test_abort_while_the_next_step_is_in_flight():
    engine = make_engine(async_scheduling=True)
    engine.add_request("a", [4, 4, 4], greedy(50))
    engine.add_request("b", [5, 6], greedy(6))
    step = engine.begin_step()
    ahead = engine.begin_step(after=step)  # scheduled before step's tokens are read
    first = engine.finish_step(step)
    assert {o.request_id: o.token_ids for o in first} == {
        "a": reference([4, 4, 4], 1), "b": reference([5, 6], 1)}
    final = engine.abort_request("a")  # its row in `ahead` is computed, then dropped
    assert final[0].finish_reason == "abort" and final[0].token_ids == reference([4, 4, 4], 1)
    second = engine.finish_step(ahead)
    assert [(o.request_id, o.token_ids) for o in second] == [("b", reference([5, 6], 2))]
    assert engine.runner.num_fed == 2
    assert run(engine)["b"][-1].token_ids == reference([5, 6], 6)
    assert_idle(engine)


def test_session_turn_that_stops_early_continues_exactly(scheduling):
    """A turn ending on a stop token while its next step is in flight leaves the session
    only the tokens it returned; the next turn computes from there."""
    turn1 = [3, 1, 4, 1, 5]
    ref = reference(turn1, 20)
    engine = make_engine(session_len=64, eos=[ref[2]])
    engine.add_request("t1", turn1, greedy(20), session_id=1, keep_session=True)
    out1 = run(engine)["t1"][-1]
    assert out1.token_ids == ref[:3] and out1.finish_reason == "stop"
    engine.add_request("t2", [9, 2], greedy(4, ignore_eos=True), session_id=1, keep_session=True)
    out2 = run(engine)["t2"][-1]
    assert out2.token_ids == reference(turn1 + ref[:3] + [9, 2], 4)
    engine.end_session(1)
    assert_idle(engine)


def test_penalties_count_pending_tokens(scheduling):
    """Penalties count every earlier token; with async scheduling the one still pending
    is filled in on the runner. The model here repeats the last token, with the next id
    as runner-up: a penalty on the last token (pending, with async) moves on to it."""
    params = [SamplingParams(temperature=0, max_tokens=8, repetition_penalty=3.0),
              SamplingParams(temperature=0, max_tokens=8, presence_penalty=1.5),
              SamplingParams(temperature=0, max_tokens=8, frequency_penalty=0.5),
              greedy(8)]
    engine = make_engine()
    engine.runner.next_token = lambda context: context[-1]
    for i, p in enumerate(params):
        engine.add_request(f"p{i}", [10, 20 * i], p)
    got = {rid: outs[-1].token_ids for rid, outs in run(engine).items()}
    assert got == {"p0": list(range(1, 9)), "p1": [20, 21, 22, 23, 24, 25, 26, 27],
                   "p2": [40, 40, 40, 41, 41, 41, 42, 42],  # 5 - 0.5 n >= 4 while n <= 2
                   "p3": [60] * 8}
    assert (engine.runner.num_fed > 0) == scheduling


# -- the async engine --------------------------------------------------------------


async def collect(engine, rid, prompt, params, **kw):
    return [out async for out in engine.generate(prompt, params, rid, **kw)]


def test_async_concurrent_consumers():
    async def main():
        engine = AsyncLLMEngine(make_engine(max_batch_size=4))
        prompts = {f"c{i}": [i, i + 1, i + 2] for i in range(8)}
        results = await asyncio.gather(*(collect(engine, rid, p, greedy(8)) for rid, p in prompts.items()))
        for outs, prompt in zip(results, prompts.values()):
            assert [o.delta_token_ids[0] for o in outs] == reference(prompt, 8)
        assert (await engine.stats())["generation_tokens_total"] == 64
        await engine.check_health()
        engine.shutdown()
        assert_idle(engine.engine)

    asyncio.run(main())


def test_async_outputs_are_handed_over_once_the_next_step_is_submitted():
    """A step's tokens reach the stream after the next step went to the runner (so the
    streaming overlaps the device's work), and an abort between steps still arrives
    after the tokens generated before it."""
    async def main():
        inner = make_engine()
        engine = AsyncLLMEngine(inner)
        outs = []
        async for out in engine.generate([4, 5, 6], greedy(6), "r"):
            outs.append((out, inner.runner.num_steps))
        # step 1 is the prefill and yields token 1; token i arrives once step i+1 ran
        for i, (out, steps) in enumerate(outs[:-1], start=1):
            assert steps >= i + 1, (i, steps)
        assert [o.delta_token_ids[0] for o, _ in outs] == reference([4, 5, 6], 6)

        got = []
        async for out in engine.generate([7, 8], greedy(10_000), "s"):
            got.append(out)
            if len(got) == 3:
                await engine.abort("s")
        tokens = [t for o in got for t in o.delta_token_ids]
        assert got[-1].finish_reason == "abort"
        assert tokens == reference([7, 8], len(tokens))
        engine.shutdown()
        assert_idle(inner)

    asyncio.run(main())


def test_async_cancel_and_abort_free_blocks():
    async def main():
        engine = AsyncLLMEngine(make_engine(delay=0.002, session_len=100_000))
        seen = []

        async def consume():
            async for out in engine.generate([1, 2, 3], greedy(50_000), "long"):
                seen.append(out)

        task = asyncio.create_task(consume())
        while len(seen) < 3:
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

        async def aborter():
            await asyncio.sleep(0.05)
            await engine.abort("other")

        outs, _ = await asyncio.gather(collect(engine, "other", [4, 5], greedy(50_000)), aborter())
        assert outs[-1].finish_reason == "abort"
        stats = await engine.stats()
        assert stats["running"] == 0 and stats["kv_cache_usage"] == 0.0
        with pytest.raises(RequestError):
            await collect(engine, "bad", [], greedy(3))
        first = asyncio.create_task(collect(engine, "dup", [1, 2], greedy(200)))
        await asyncio.sleep(0.01)
        with pytest.raises(RequestError, match="already in use"):
            await collect(engine, "dup", [1, 2], greedy(3))
        assert (await first)[-1].token_ids == reference([1, 2], 200)
        engine.shutdown()

    asyncio.run(main())


def test_async_loop_errors_reach_waiting_requests():
    async def main():
        inner = make_engine(delay=0.002, session_len=100_000)
        engine = AsyncLLMEngine(inner)
        task = asyncio.create_task(collect(engine, "x", [1, 2], greedy(50_000)))
        await asyncio.sleep(0.05)
        inner.runner.fail = True
        with pytest.raises(EngineDeadError, match="device lost"):
            await asyncio.wait_for(task, 5)
        with pytest.raises(EngineDeadError):
            await collect(engine, "y", [1, 2], greedy(3))
        assert not engine.is_running
        with pytest.raises(EngineDeadError):
            await engine.check_health()
        engine.shutdown()

    asyncio.run(main())


def test_idle_loop_notices_a_dead_rank():
    """A runner whose check_health fails while no request runs stops the engine."""
    async def main():
        inner = make_engine()
        inner.runner.check_health = lambda: None
        engine = AsyncLLMEngine(inner, health_check_period_s=0.02)
        assert (await collect(engine, "a", [1, 2], greedy(3)))[-1].token_ids == reference([1, 2], 3)
        await asyncio.sleep(0.1)
        assert engine.is_running  # healthy while idle

        def dead():
            raise RuntimeError("rank 1 died")

        inner.runner.check_health = dead
        for _ in range(100):
            if not engine.is_running:
                break
            await asyncio.sleep(0.02)
        with pytest.raises(EngineDeadError, match="rank 1 died"):
            await engine.check_health()
        engine.shutdown()

    asyncio.run(main())


def test_async_sessions_and_n():
    async def main():
        engine = AsyncLLMEngine(make_engine())
        outs = await collect(engine, "t1", [3, 1, 4], greedy(4), session_id="s", keep_session=True)
        history = [3, 1, 4] + outs[-1].token_ids
        outs = await collect(engine, "t2", [5], greedy(4), session_id="s", keep_session=True)
        assert outs[-1].token_ids == reference(history + [5], 4)
        await engine.end_session("s")
        outs = await collect(engine, "n", [7, 7], greedy(3, n=2))
        assert sorted(o.request_id for o in outs if o.finished) == ["n[0]", "n[1]"]
        engine.shutdown()
        assert_idle(engine.engine)

    asyncio.run(main())


def test_async_engine_under_random_load_with_aborts_and_sessions(scheduling):
    """Many concurrent streams through the engine thread: some stop on a stop token, some
    are aborted or cancelled mid-stream, some continue sessions, some ask for n=2, in a
    cache small enough to preempt. Every stream that ends by itself gets the reference
    tokens, every aborted one a prefix of them, and no KV block stays in use."""
    stop_ids = (11, 23)

    async def main():
        inner = make_engine(num_blocks=40, max_batch_size=6, max_prefill_tokens=16,
                            session_len=200, delay=0.0005)
        engine = AsyncLLMEngine(inner)
        rng = random.Random(5)

        async def one(i):
            await asyncio.sleep(rng.random() * 0.05)
            prompt = [rng.randrange(1, V) for _ in range(rng.randrange(1, 20))]
            max_tokens = rng.randrange(1, 25)
            params = greedy(max_tokens, stop_token_ids=list(stop_ids))
            want = reference(prompt, max_tokens, stop_ids)
            kind = rng.choice(["plain", "abort", "cancel", "session", "n"])
            if kind == "n":
                outs = await collect(engine, f"q{i}", prompt, greedy(max_tokens, n=2,
                                                                     stop_token_ids=list(stop_ids)))
                finals = [o for o in outs if o.finished]
                assert len(finals) == 2 and all(o.token_ids == want for o in finals)
            elif kind == "session":
                outs = await collect(engine, f"q{i}", prompt, params, session_id=i,
                                     keep_session=True)
                assert outs[-1].token_ids == want
                more = [rng.randrange(1, V) for _ in range(3)]
                outs = await collect(engine, f"q{i}b", more, greedy(5), session_id=i)
                assert outs[-1].token_ids == reference(prompt + want + more, 5)
            elif kind == "plain":
                outs = await collect(engine, f"q{i}", prompt, params)
                assert outs[-1].token_ids == want and outs[-1].finish_reason in ("stop", "length")
            else:
                got = []
                stream = engine.generate(prompt, greedy(10_000), f"q{i}")
                async for out in stream:
                    got.extend(out.delta_token_ids)
                    if len(got) >= 3:
                        break
                if kind == "abort":
                    await engine.abort(f"q{i}")
                await stream.aclose()  # a consumer that leaves aborts its request
                assert got == reference(prompt, len(got))

        await asyncio.gather(*(one(i) for i in range(40)))
        stats = await engine.stats()
        assert stats["running"] == 0 and stats["waiting"] == 0
        engine.shutdown()
        assert_idle(inner)
        assert (inner.runner.num_fed > 0) == scheduling

    asyncio.run(main())
