"""KVBlockPool: the paged KV cache's blocks, ref-counted, with prefix caching.

Every rank holds the same number of blocks and the same block ids, so one
pool in the engine decides for all of them. A block is identified by the
hash chain of the tokens it holds: hash(parent block's hash, its tokens),
computed for FULL blocks only. Full blocks are registered in a hash table as
soon as they are allocated for tokens that the coming step computes; the
model runner writes a step's K/V into the cache before attention reads it in
each layer, so another request of the same step may already share them.

A block whose ref count drops to zero keeps its hash and stays reusable
until it is evicted: free blocks without a hash are handed out first, then
cached ones in least-recently-freed order.
"""
from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass

from .request import Request


@dataclass
class KVBlock:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None  # set while registered in the prefix table


def hash_block(parent_hash: int | None, token_ids: tuple[int, ...]) -> int:
    return hash((parent_hash, token_ids))


class KVBlockPool:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self._free_plain: deque[int] = deque(range(num_blocks))
        self._free_cached: OrderedDict[int, None] = OrderedDict()  # LRU first
        self._hash_to_block: dict[int, int] = {}
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0

    # -- queries ---------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_plain) + len(self._free_cached)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hit_tokens / self.prefix_query_tokens if self.prefix_query_tokens else 0.0

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- request-level operations -----------------------------------------

    def get_computed_blocks(self, request: Request) -> int:
        """Attaches the longest cached prefix of a request that holds no blocks.

        Returns the number of tokens served from the cache. The last token is
        never served: it must be computed to produce the next token's logits.
        """
        if request.block_ids:
            return 0
        if not self.enable_prefix_caching:
            return 0
        self._hash_full_blocks(request, request.num_tokens - 1)
        hits = []
        for block_hash in request.block_hashes[:(request.num_tokens - 1) // self.block_size]:
            block_id = self._hash_to_block.get(block_hash)
            if block_id is None:
                break
            hits.append(block_id)
        for block_id in hits:
            self._take(block_id)
        request.block_ids = hits
        request.num_computed_tokens = len(hits) * self.block_size
        return request.num_computed_tokens

    def allocate_slots(self, request: Request, num_new_tokens: int) -> bool:
        """Grows the request's block table to hold num_new_tokens more tokens.

        Returns False, changing nothing, when too few blocks are free.
        """
        total = request.num_computed_tokens + num_new_tokens
        needed = self.blocks_needed(total) - len(request.block_ids)
        if needed > self.num_free_blocks:
            return False
        for _ in range(max(needed, 0)):
            request.block_ids.append(self._pop_free())
        if self.enable_prefix_caching:
            self._register_full_blocks(request, total)
        return True

    def free(self, request: Request) -> None:
        """Releases the request's blocks; the tail goes first so shared prefixes live longest."""
        self.free_blocks(request.block_ids)
        request.block_ids = []
        request.num_computed_tokens = 0

    def free_blocks(self, block_ids: list[int]) -> None:
        for block_id in reversed(block_ids):
            self._release(block_id)

    def record_prefix_lookup(self, num_query_tokens: int, num_hit_tokens: int) -> None:
        """Counts one admitted request's lookup (not the retries of one that did not fit)."""
        self.prefix_query_tokens += num_query_tokens
        self.prefix_hit_tokens += num_hit_tokens

    def reset_prefix_cache(self) -> None:
        """Forgets every cached hash (e.g. after the cache's contents became invalid)."""
        for block in self.blocks:
            block.block_hash = None
        self._hash_to_block.clear()
        self._free_plain.extend(self._free_cached)
        self._free_cached.clear()

    # -- internals ---------------------------------------------------------

    def _hash_full_blocks(self, request: Request, num_tokens: int) -> None:
        """Hashes the full blocks of the first num_tokens tokens that are known (not
        pending: a block ending in a pending token is hashed on a later call)."""
        hashes, size = request.block_hashes, self.block_size
        num_tokens = min(num_tokens, len(request.token_ids))
        for i in range(len(hashes), num_tokens // size):
            parent = hashes[i - 1] if i else None
            hashes.append(hash_block(parent, tuple(request.token_ids[i * size:(i + 1) * size])))

    def _register_full_blocks(self, request: Request, num_tokens: int) -> None:
        self._hash_full_blocks(request, num_tokens)
        # blocks below num_computed_tokens were registered when they were allocated or hit,
        # except the last of them when a pending token completed it (not hashable then)
        first = request.num_computed_tokens // self.block_size
        if first and self.blocks[request.block_ids[first - 1]].block_hash is None:
            first -= 1
        for i in range(first, min(len(request.block_hashes), num_tokens // self.block_size)):
            block = self.blocks[request.block_ids[i]]
            block_hash = request.block_hashes[i]
            if block.block_hash is None and block_hash not in self._hash_to_block:
                block.block_hash = block_hash
                self._hash_to_block[block_hash] = block.block_id

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._free_cached[block_id]
        block.ref_count += 1

    def _pop_free(self) -> int:
        if self._free_plain:
            block_id = self._free_plain.popleft()
        else:
            block_id, _ = self._free_cached.popitem(last=False)
            self._evict(self.blocks[block_id])
        self.blocks[block_id].ref_count = 1
        return block_id

    def _evict(self, block: KVBlock) -> None:
        if block.block_hash is not None:
            del self._hash_to_block[block.block_hash]
            block.block_hash = None

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        if block.ref_count > 0:
            return
        if block.block_hash is None:
            self._free_plain.append(block_id)
        else:
            self._free_cached[block_id] = None
