import random

import pytest

from tpserve.engine.block_manager import KVBlockPool
from tpserve.engine.config import EngineConfig
from tpserve.engine.errors import RequestError
from tpserve.engine.request import Request
from tpserve.engine.sampling_params import SamplingParams
from tpserve.engine.scheduler import Scheduler

BS = 4


def make_scheduler(num_blocks=64, **config):
    config = EngineConfig(cache_block_seq_len=BS, **config)
    return Scheduler(config, KVBlockPool(num_blocks, BS))


def make(rid, n_prompt, max_tokens=4, scheduler=None, session_id=None, keep=False, base=0):
    context = scheduler.session_context(session_id) if scheduler else []
    return Request.new(rid, [base + i % 50 for i in range(n_prompt)], SamplingParams(max_tokens=max_tokens),
                       context_token_ids=context, session_id=session_id, keep_session=keep)


def step(scheduler, out_log=None):
    """One engine step without a model: computed tokens advance, sampled tokens are 7."""
    out = scheduler.schedule()
    if out_log is not None:
        out_log.append(out)
    for chunk in out.scheduled:
        request = chunk.request
        assert request.block_ids and len(request.block_ids) * BS >= chunk.context_len + chunk.num_new_tokens
        request.num_computed_tokens += chunk.num_new_tokens
        if chunk.wants_logits:
            request.append_token(7)
            if request.num_output_tokens >= request.sampling_params.max_tokens:
                scheduler.finish(request, "length")
    return out


def run_all(scheduler, limit=10_000):
    log = []
    for _ in range(limit):
        if not scheduler.has_unfinished():
            return log
        step(scheduler, log)
    raise AssertionError("scheduler did not drain")


def assert_no_blocks_held(scheduler):
    pool = scheduler.pool
    assert pool.num_free_blocks == pool.num_blocks
    assert all(b.ref_count == 0 for b in pool.blocks)


def test_budget_and_batch_size_respected():
    s = make_scheduler(max_prefill_tokens=16, max_batch_size=3)
    for i in range(6):
        s.add_request(make(f"r{i}", 10, max_tokens=5))
    log = run_all(s)
    assert all(out.num_scheduled_tokens <= 16 for out in log)
    assert all(len(out.scheduled) <= 3 for out in log)
    assert_no_blocks_held(s)


def test_chunked_prefill():
    s = make_scheduler(max_prefill_tokens=32)
    r = make("long", 100, max_tokens=2)
    s.add_request(r)
    chunks = [step(s).scheduled[0] for _ in range(4)]
    assert [c.num_new_tokens for c in chunks] == [32, 32, 32, 4]
    assert [c.context_len for c in chunks] == [0, 32, 64, 96]
    assert [c.wants_logits for c in chunks] == [False, False, False, True]
    assert r.output_token_ids == [7]
    decode = step(s).scheduled[0]
    assert (decode.num_new_tokens, decode.wants_logits) == (1, True)
    assert r.is_finished and r.finish_reason == "length"


def test_running_requests_come_first_then_fcfs():
    s = make_scheduler(max_prefill_tokens=12)
    s.add_request(make("a", 8, max_tokens=3))
    step(s)
    s.add_request(make("b", 20, max_tokens=3))
    s.add_request(make("c", 5, max_tokens=3))
    out = step(s)
    assert [(c.request.request_id, c.num_new_tokens) for c in out.scheduled] == [("a", 1), ("b", 11)]


def test_preemption_when_blocks_run_out_then_completion():
    s = make_scheduler(num_blocks=10, max_prefill_tokens=64)  # 40 token slots
    requests = [make(f"r{i}", 9, max_tokens=12, base=10 * i) for i in range(3)]  # 21 tokens each
    for r in requests:
        s.add_request(r)
    log = run_all(s)
    preempted = [r.request_id for out in log for r in out.preempted]
    assert preempted, "the cache is too small for all three: someone must be preempted"
    assert preempted[0] == "r2"  # the most recently started goes first
    assert all(r.finish_reason == "length" and r.num_output_tokens == 12 for r in requests)
    assert s.num_preemptions == len(preempted)
    assert_no_blocks_held(s)


def test_request_that_can_never_fit_is_finished_with_a_message():
    s = make_scheduler(num_blocks=4)
    big = make("big", 17)
    ok = make("ok", 5)
    s.add_request(big)
    s.add_request(ok)
    out = step(s)
    assert out.finished == (big,)
    assert big.finish_reason == "length" and "KV blocks" in big.error
    assert [c.request for c in out.scheduled] == [ok]
    run_all(s)
    assert_no_blocks_held(s)


def test_request_that_outgrows_the_cache_alone_stops():
    s = make_scheduler(num_blocks=3)
    r = make("grow", 10, max_tokens=100)
    s.add_request(r)
    run_all(s)
    assert r.finish_reason == "length" and r.error and r.num_tokens == 13
    assert_no_blocks_held(s)


def test_abort_frees_blocks_at_once():
    s = make_scheduler()
    a, b = make("a", 10, max_tokens=50), make("b", 10, max_tokens=50)
    s.add_request(a)
    s.add_request(b)
    step(s)
    free_before = s.pool.num_free_blocks
    assert s.abort("a") is a and a.finish_reason == "abort"
    assert s.pool.num_free_blocks > free_before
    assert s.abort("a") is None
    s.abort("b")
    assert not s.has_unfinished()
    assert_no_blocks_held(s)


def test_session_keeps_blocks_and_continues():
    s = make_scheduler(session_len=64)
    first = make("t1", 10, max_tokens=3, scheduler=s, session_id=1, keep=True)
    s.add_request(first)
    run_all(s)
    session = s.sessions[1]
    assert session.token_ids == first.token_ids and len(session.token_ids) == 13
    assert session.num_computed_tokens == 12  # the last sampled token was never fed back
    assert s.pool.num_free_blocks == s.pool.num_blocks - 3
    second = make("t2", 5, max_tokens=3, scheduler=s, session_id=1, keep=True)
    assert second.num_context_tokens == 13 and second.prompt_token_ids == list(range(5))
    s.add_request(second)
    chunk = step(s).scheduled[0]
    assert (chunk.context_len, chunk.num_new_tokens) == (12, 6)
    run_all(s)
    assert len(s.sessions[1].token_ids) == 21
    assert s.end_session(1) and 1 not in s.sessions
    assert_no_blocks_held(s)


def test_session_length_limits():
    s = make_scheduler(session_len=20)
    with pytest.raises(RequestError, match="session_len"):
        s.add_request(make("too-long", 20))
    first = make("t1", 10, max_tokens=3, scheduler=s, session_id="x", keep=True)
    s.add_request(first)
    with pytest.raises(RequestError, match="in progress"):
        s.add_request(make("t1b", 2, scheduler=s, session_id="x"))
    run_all(s)
    with pytest.raises(RequestError, match="session"):
        s.add_request(make("t2", 8, scheduler=s, session_id="x", keep=True))
    with pytest.raises(RequestError, match="empty"):
        s.add_request(make("t3", 0))
    s.end_session("x")
    assert_no_blocks_held(s)


def test_end_session_while_running_aborts_it():
    s = make_scheduler()
    r = make("t1", 10, max_tokens=30, scheduler=s, session_id=5, keep=True)
    s.add_request(r)
    step(s)
    assert s.end_session(5)
    assert r.finish_reason == "abort" and 5 not in s.sessions
    assert_no_blocks_held(s)


def test_preempted_request_resumes_from_prefix_cache():
    s = make_scheduler(num_blocks=10, max_prefill_tokens=64)
    a = make("a", 16, max_tokens=10, base=0)
    b = make("b", 16, max_tokens=10, base=100)
    s.add_request(a)
    s.add_request(b)
    log = run_all(s)
    assert any(out.preempted for out in log)
    resumed = [c for out in log for c in out.scheduled
               if c.request.request_id == "b" and c.context_len > 0 and c.num_new_tokens > 1]
    assert resumed, "b's recompute should start past its cached prefix"
    assert_no_blocks_held(s)


def _random_request(rng, s, index):
    session = rng.choice([None, None, None, "s0", "s1", "s2"])
    if session is not None and (s.sessions.get(session) and s.sessions[session].active_request_id
                                or len(s.session_context(session)) > 60):
        session = None
    return make(f"r{index}", rng.randrange(1, 60), max_tokens=rng.randrange(1, 20),
                base=rng.choice([0, 0, 1000 + index]), scheduler=s, session_id=session,
                keep=rng.random() < 0.8)


def test_thousand_random_requests_with_aborts_leave_no_blocks():
    rng = random.Random(1234)
    s = make_scheduler(num_blocks=40, max_prefill_tokens=48, max_batch_size=16, session_len=150)
    added, steps, finished_by_scheduler = 0, 0, 0
    while added < 1000 or s.has_unfinished():
        for _ in range(rng.randrange(0, 4) if added < 1000 else 0):
            s.add_request(_random_request(rng, s, added))
            added += 1
        if s.requests and rng.random() < 0.2:
            s.abort(rng.choice(list(s.requests)))
        if rng.random() < 0.05:
            s.end_session(rng.choice(["s0", "s1", "s2"]))
        out = step(s)
        finished_by_scheduler += len(out.finished)
        steps += 1
        assert out.num_scheduled_tokens <= 48 and len(s.running) <= 16
        held = {b for r in s.running + list(s.waiting) for b in r.block_ids}
        held |= {b for sess in s.sessions.values() for b in sess.block_ids}
        assert s.pool.num_blocks - s.pool.num_free_blocks == len(held)
        assert steps < 50_000
    for session_id in list(s.sessions):
        s.end_session(session_id)
    assert not s.requests
    assert_no_blocks_held(s)
    assert s.pool.prefix_hit_tokens > 0


def test_waiting_session_turns_do_not_starve_a_request_that_needs_their_blocks():
    """A session's next turn holds the session's blocks while it waits. When a request
    ahead of it cannot fit and nothing runs, the waiting turn gives its blocks up (to be
    recomputed from the prefix cache) instead of the request ahead failing as too long."""
    s = make_scheduler(num_blocks=8, session_len=64)
    first = make("t1", 18, max_tokens=2, scheduler=s, session_id=1, keep=True)
    s.add_request(first)
    run_all(s)
    assert len(s.sessions[1].block_ids) == 5  # 20 tokens, 19 computed
    big = make("big", 20, max_tokens=2, base=100)  # 6 blocks with its first token: 3 free
    s.add_request(big)
    turn = make("t2", 2, max_tokens=2, scheduler=s, session_id=1)  # holds the 5 blocks
    s.add_request(turn)
    assert turn.block_ids and s.pool.num_free_blocks == 3
    out = step(s)
    assert [c.request.request_id for c in out.scheduled] == ["big"] and not out.finished
    assert not turn.block_ids and turn.num_computed_tokens == 0
    run_all(s)
    assert big.finish_reason == turn.finish_reason == "length" and big.error is None
    assert turn.error is None and turn.num_cached_tokens > 0  # its old blocks were hit again
    assert_no_blocks_held(s)


def test_idle_sessions_give_their_blocks_to_new_requests_least_recently_used_first():
    s = make_scheduler(num_blocks=12, session_len=64)
    for sid in (1, 2, 3):  # 11 tokens each -> 3 blocks held by each idle session
        s.add_request(make(f"s{sid}", 9, max_tokens=2, scheduler=s, session_id=sid, keep=True,
                           base=50 * sid))
        run_all(s)
    s.add_request(make("again", 1, max_tokens=2, scheduler=s, session_id=1, keep=True))
    run_all(s)  # session 1 is now the most recently used (and holds 4 blocks)
    assert [len(s.sessions[i].block_ids) for i in (1, 2, 3)] == [4, 3, 3] and \
        s.pool.num_free_blocks == 2
    big = make("big", 15, max_tokens=2, base=1000)  # 4 blocks: 2 free, so one session goes
    s.add_request(big)
    step(s)
    assert big.status.value == "running" and s.num_session_evictions == 1
    assert [len(s.sessions[i].block_ids) for i in (1, 2, 3)] == [4, 0, 3]  # session 2 went
    run_all(s)
    assert big.error is None and s.num_session_evictions == 1
    assert s.sessions[2].num_computed_tokens == 0 and len(s.sessions[2].token_ids) == 11
    turn = make("t", 2, max_tokens=2, scheduler=s, session_id=2)
    assert turn.num_context_tokens == 11 and not turn.block_ids
    s.add_request(turn)
    run_all(s)  # the evicted history is recomputed
    assert turn.error is None and turn.num_output_tokens == 2
    for sid in (1, 3):
        s.end_session(sid)
    assert_no_blocks_held(s)
