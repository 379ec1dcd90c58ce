import random

from tpserve.engine.block_manager import KVBlockPool
from tpserve.engine.request import Request
from tpserve.engine.sampling_params import SamplingParams

BS = 4


def make(rid, tokens):
    return Request.new(rid, list(tokens), SamplingParams())


def admit(pool, request):
    """What the scheduler does for a new request: prefix lookup, then slots for the rest."""
    cached = pool.get_computed_blocks(request)
    assert pool.allocate_slots(request, request.num_tokens - request.num_computed_tokens)
    request.num_computed_tokens = request.num_tokens
    return cached


def assert_all_free(pool):
    assert pool.num_free_blocks == pool.num_blocks
    assert all(b.ref_count == 0 for b in pool.blocks)
    assert pool.usage == 0.0


def test_ref_counts_and_free():
    pool = KVBlockPool(8, BS)
    a, b = make("a", range(10)), make("b", range(100, 106))
    admit(pool, a)
    admit(pool, b)
    assert len(a.block_ids) == 3 and len(b.block_ids) == 2
    assert pool.num_free_blocks == 3
    assert abs(pool.usage - 5 / 8) < 1e-9
    pool.free(a)
    pool.free(b)
    assert a.block_ids == [] and b.block_ids == []
    assert_all_free(pool)


def test_prefix_hit_shares_full_blocks():
    pool = KVBlockPool(16, BS)
    a = make("a", range(10))  # blocks [0..3] [4..7] full, [8, 9] partial
    admit(pool, a)
    b = make("b", list(range(8)) + [50, 51, 52])
    assert pool.get_computed_blocks(b) == 8
    assert b.block_ids == a.block_ids[:2]
    assert [pool.blocks[i].ref_count for i in b.block_ids] == [2, 2]
    assert pool.allocate_slots(b, 3)
    assert b.block_ids[2] != a.block_ids[2]
    pool.free(a)
    pool.free(b)
    assert_all_free(pool)


def test_never_serves_the_whole_prompt():
    pool = KVBlockPool(16, BS)
    a = make("a", range(8))
    admit(pool, a)
    same = make("same", range(8))
    assert pool.get_computed_blocks(same) == 4  # the last token must be computed again
    assert same.num_computed_tokens == 4
    pool.free(same)
    pool.free(a)
    assert_all_free(pool)


def test_chain_hash_depends_on_parent():
    pool = KVBlockPool(16, BS)
    admit(pool, make("a", [1, 2, 3, 4, 5, 6, 7, 8, 9]))
    other = make("b", [0, 2, 3, 4, 5, 6, 7, 8, 9])  # same second block, different first
    assert pool.get_computed_blocks(other) == 0


def test_freed_blocks_stay_cached_until_evicted_lru():
    pool = KVBlockPool(6, BS)
    a, b = make("a", range(0, 9)), make("b", range(100, 109))
    admit(pool, a)
    admit(pool, b)
    pool.free(a)  # a's blocks are older in the free list than b's
    pool.free(b)
    assert_all_free(pool)
    # the two partial blocks had no hash: they are handed out first, evicting nothing
    c = make("c", range(200, 208))
    assert pool.allocate_slots(c, 8)
    assert pool.num_free_blocks == 4
    # one more block must come from the cached ones: a's tail block (least recently freed)
    d = make("d", range(300, 304))
    assert pool.allocate_slots(d, 4)
    assert pool.get_computed_blocks(make("a3", range(0, 9))) == 4
    assert pool.get_computed_blocks(make("b2", range(100, 109))) == 8


def test_hit_blocks_leave_the_free_list():
    pool = KVBlockPool(4, BS)
    a = make("a", range(9))
    admit(pool, a)
    pool.free(a)
    b = make("b", range(9))
    assert pool.get_computed_blocks(b) == 8
    assert pool.num_free_blocks == 2
    assert pool.allocate_slots(b, 1)
    c = make("c", range(50, 58))
    assert pool.allocate_slots(c, 8) is False  # one block left, two needed
    assert c.block_ids == []
    assert pool.get_computed_blocks(make("b2", range(9))) == 8  # b's blocks were not evicted


def test_allocation_failure_changes_nothing():
    pool = KVBlockPool(2, BS)
    a = make("a", range(12))
    assert pool.allocate_slots(a, 12) is False
    assert a.block_ids == [] and pool.num_free_blocks == 2


def test_decoded_blocks_become_cacheable_when_full():
    pool = KVBlockPool(8, BS)
    a = make("a", range(6))
    admit(pool, a)
    for t in (90, 91, 92):  # decode: each sampled token is computed by the next step
        a.append_token(t)
        assert pool.allocate_slots(a, 1)
        a.num_computed_tokens += 1
    a.append_token(93)
    follow = make("f", list(range(6)) + [90, 91, 92, 93, 5])
    assert pool.get_computed_blocks(follow) == 8


def test_prefix_caching_off():
    pool = KVBlockPool(8, BS, enable_prefix_caching=False)
    admit(pool, make("a", range(9)))
    assert pool.get_computed_blocks(make("b", range(9))) == 0


def test_random_operations_leak_nothing():
    rng = random.Random(0)
    pool = KVBlockPool(32, BS)
    live = []
    for step in range(2000):
        if live and rng.random() < 0.4:
            pool.free(live.pop(rng.randrange(len(live))))
            continue
        prefix = [rng.randrange(3)] * rng.randrange(0, 12)
        r = make(str(step), prefix + [rng.randrange(50) for _ in range(rng.randrange(1, 10))])
        pool.get_computed_blocks(r)
        if pool.allocate_slots(r, r.num_tokens - r.num_computed_tokens):
            r.num_computed_tokens = r.num_tokens
            live.append(r)
        else:
            pool.free(r)
        in_use = sum(len(x.block_ids) for x in live)
        distinct = len({b for x in live for b in x.block_ids})
        assert pool.num_blocks - pool.num_free_blocks == distinct <= in_use
    for r in live:
        pool.free(r)
    assert_all_free(pool)
