"""Which KV-cache blocks each sequence holds, and which full blocks can be shared.

The pool (kv_cache.py) is a fixed number of blocks of BLOCK_SIZE token slots.
A sequence holds a block table: block i keeps its positions
[i * BLOCK_SIZE, (i + 1) * BLOCK_SIZE). Memory therefore follows the tokens
held, not rows x longest sequence.

Prefix caching (vLLM's automatic prefix caching, nano-vllm's block manager):
a block, once full and computed, is registered under a hash of its token ids,
the hash of the block before it, the sequence's position key (what
changes a cached key: the rotary table, log-n, the ReRoPE window and leak)
and what the cache stores (--kv-cache-dtype: a block of int8 codes is never
read as one of floats, should pools ever be shared).
A new sequence whose leading blocks hash the same takes them instead of
computing them. Blocks nobody holds stay cached and are evicted least
recently used first when a fresh block is needed.

Blocks are reference counted: beam rows share their prompt's blocks and
copy a shared partial block before they write into it (copy on write).

A block's digest is SHA-256 chained over the digest of the block before it,
the block's token ids and the position key (as vLLM does since
GHSA-rm76-4mrf-v9r8). Python's tuple hash is not salted for ints and tuples,
so a client could craft two prompts whose blocks collide; equal token ids
with a different prefix or position method would then have handed one
request another's keys and values. A hit also compares the block's token ids.
"""

from __future__ import annotations

import hashlib
import heapq
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache

from longserve.server.engine.native.kv_cache import BLOCK_SIZE, KvPool
from longserve.server.engine.native.sequence import Sequence


def blocks_for(tokens: int) -> int:
    return -(-tokens // BLOCK_SIZE)


@lru_cache(maxsize=256)
def position_digest(position_key: tuple) -> bytes:
    """The position key (floats, bools, ints: repr round-trips each exactly) as 32 bytes, once per key."""
    return hashlib.sha256(repr(position_key).encode()).digest()


def block_digest(parent: bytes | None, tokens: tuple[int, ...], position_key: tuple) -> bytes:
    """SHA-256 of (the previous block's digest, or 32 zero bytes for the first; the token ids as 64-bit
    integers; the position key's digest): every input has a fixed width, so no two inputs run into each other."""
    digest = hashlib.sha256(parent if parent is not None else bytes(32))
    digest.update(array("q", tokens).tobytes())
    digest.update(position_digest(position_key))
    return digest.digest()


@dataclass
class Block:
    ref_count: int = 0
    hash: bytes | None = None  # block_digest, once the block is full and computed (prefix caching on)
    token_ids: tuple[int, ...] = ()


class BlockManager:
    def __init__(self, pool: KvPool, prefix_caching: bool = True):
        self.pool = pool
        self.prefix_caching = prefix_caching
        self.blocks = [Block() for _ in range(pool.num_blocks)]
        self.free_ids: list[int] = list(range(pool.num_blocks))  # a heap, lowest first: memory in use stays compact
        self.cached_free: OrderedDict[int, None] = OrderedDict()  # hold a cached prefix, nobody uses them; LRU first
        self.by_hash: dict[bytes, int] = {}
        self.reserved = 0  # blocks promised to admitted groups (NBCE, beams) for their growth
        self.queries = 0  # prompt tokens looked up in the prefix cache
        self.hits = 0  # of which found

    def identity(self, seq: Sequence) -> tuple:
        """What a cached block's keys depend on besides its tokens: the cache's format and the position key."""
        return (self.pool.cache.name, seq.positions.cache_key)

    @property
    def num_free(self) -> int:
        return len(self.free_ids) + len(self.cached_free)

    @property
    def in_use(self) -> int:
        """Blocks some sequence holds."""
        return len(self.blocks) - self.num_free

    @property
    def available(self) -> int:
        """Blocks a new admission may take: free ones not promised to a group."""
        return self.num_free - self.reserved

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / len(self.blocks)

    # ---- admission ---------------------------------------------------------

    def prefix_hits(self, seq: Sequence, target: int) -> list[int]:
        """The cached blocks that can start `seq`'s table. At least the last token of
        `target` is left to compute, so the step that reaches it has logits to sample from."""
        if not self.prefix_caching or seq.params.prompt_logprobs is not None:  # scores need every position computed
            return []
        found, parent, ids = [], None, seq.all_ids  # all_ids builds a list: once, not once per block
        for index in range((target - 1) // BLOCK_SIZE):
            tokens = tuple(ids[index * BLOCK_SIZE : (index + 1) * BLOCK_SIZE])
            parent = block_digest(parent, tokens, self.identity(seq))
            block_id = self.by_hash.get(parent)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            found.append(block_id)
        return found

    def admit(self, seq: Sequence, target: int) -> bool:
        """Give `seq` blocks for positions [0, target), reusing cached ones; False (and no change) if they do not fit."""
        hits = self.prefix_hits(seq, target)
        fresh = blocks_for(target) - len(hits)
        reusable_free = sum(1 for block_id in hits if self.blocks[block_id].ref_count == 0)
        if fresh + reusable_free > self.available:
            return False
        for block_id in hits:
            self._take(block_id)
        seq.block_table = hits + [self._fresh() for _ in range(fresh)]
        seq.num_cached = seq.cached_tokens = len(hits) * BLOCK_SIZE
        return True

    def count_lookup(self, seq: Sequence) -> None:
        """Count an admitted sequence's prompt in the prefix-cache figures (vLLM's queries and hits, in tokens)."""
        if self.prefix_caching and seq.params.prompt_logprobs is None:
            self.queries += seq.prefill_target
            self.hits += seq.cached_tokens

    # ---- growth --------------------------------------------------------------

    def needs_block(self, seq: Sequence) -> bool:
        """Whether writing position seq.num_cached takes a new block (a fresh one, or a copy of a shared one)."""
        index = seq.num_cached // BLOCK_SIZE
        return index >= len(seq.block_table) or self.blocks[seq.block_table[index]].ref_count > 1

    def can_grow(self, seq: Sequence) -> bool:
        if not self.needs_block(seq):
            return True
        reserve = seq.group.reserve if seq.group is not None else 0
        return (reserve > 0 and self.num_free > 0) or self.available > 0

    def grow(self, seq: Sequence) -> None:
        """Make position seq.num_cached writable by `seq` alone (can_grow must be true)."""
        index = seq.num_cached // BLOCK_SIZE
        if not self.needs_block(seq):
            return
        group = seq.group
        if group is not None and group.reserve > 0:
            group.reserve -= 1
            self.reserved -= 1
        block_id = self._fresh()
        if index < len(seq.block_table):  # shared (beam rows): copy, then write our own
            shared = seq.block_table[index]
            self.pool.copy_block(shared, block_id)
            self._release(shared)
            seq.block_table[index] = block_id
        else:
            seq.block_table.append(block_id)

    def reserve(self, group, blocks: int) -> bool:
        if blocks > self.available:
            return False
        group.reserve += blocks
        self.reserved += blocks
        return True

    def unreserve(self, group) -> None:
        self.reserved -= group.reserve
        group.reserve = 0

    def fork(self, rows: list[Sequence], sources: list[Sequence]) -> None:
        """Row i continues sources[i]'s cache (beam search): tables are shared, not copied."""
        tables = [list(source.block_table) for source in sources]  # read every source before any row changes
        for table in tables:
            for block_id in table:
                self._take(block_id)
        for row, table in zip(rows, tables):
            self.free(row)
            row.block_table = table

    # ---- release and caching -------------------------------------------------

    def free(self, seq: Sequence) -> None:
        for block_id in reversed(seq.block_table):  # the tail is evicted first: the head is the likelier prefix
            self._release(block_id)
        seq.block_table = []

    def cache_computed(self, seq: Sequence, start: int, end: int) -> None:
        """Positions [start, end) of `seq` were computed: register the blocks they filled, so others can share them."""
        if not self.prefix_caching:
            return
        for index in range(start // BLOCK_SIZE, end // BLOCK_SIZE):
            block_id = seq.block_table[index]
            block = self.blocks[block_id]
            parent = self.blocks[seq.block_table[index - 1]].hash if index > 0 else None
            if block.hash is not None or (index > 0 and parent is None):
                continue
            block.token_ids = tuple(seq.all_ids[index * BLOCK_SIZE : (index + 1) * BLOCK_SIZE])
            block.hash = block_digest(parent, block.token_ids, self.identity(seq))
            self.by_hash.setdefault(block.hash, block_id)  # an equal block computed at once by another: keep the first

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            self.cached_free.pop(block_id, None)
        block.ref_count += 1

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        if block.ref_count > 0:
            return
        if block.hash is not None and self.by_hash.get(block.hash) == block_id:
            self.cached_free[block_id] = None
        else:
            block.hash, block.token_ids = None, ()
            heapq.heappush(self.free_ids, block_id)

    def _fresh(self) -> int:
        if self.free_ids:
            block_id = heapq.heappop(self.free_ids)
            self.pool.prepare(block_id)
        else:  # evict the least recently used cached block
            block_id, _ = self.cached_free.popitem(last=False)
            evicted = self.blocks[block_id]
            del self.by_hash[evicted.hash]  # only registered blocks wait in cached_free
            evicted.hash, evicted.token_ids = None, ()
        self.blocks[block_id].ref_count = 1
        return block_id
