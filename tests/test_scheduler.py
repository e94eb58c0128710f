"""Scheduler and KV-cache bookkeeping, without a model."""

from __future__ import annotations

import pytest
import torch

from server.engine.base import EngineOverloaded, SamplingParams
from server.engine.native.kv_cache import CAPACITY_BLOCK, SlotCache
from server.engine.native.scheduler import Scheduler
from server.engine.native.sequence import Sequence, Status


def cache(max_slots=4, max_len=2048) -> SlotCache:
    return SlotCache(num_layers=2, num_kv_heads=1, head_dim=4, max_slots=max_slots, max_len=max_len, dtype=torch.float32, device=torch.device("cpu"))


def seq(tokenizer, prompt_len: int, name: str = "r") -> Sequence:
    return Sequence(name, 0, list(range(3, 3 + prompt_len)), SamplingParams(), lambda d: None, tokenizer.backend_tokenizer, frozenset())


def test_admission_is_bounded_by_max_num_seqs_and_prefill_is_chunked(tokenizer):
    scheduler = Scheduler(cache(), max_num_seqs=2, max_waiting=4, prefill_chunk=100)
    a, b, c = seq(tokenizer, 250, "a"), seq(tokenizer, 10, "b"), seq(tokenizer, 10, "c")
    scheduler.add([a, b, c])
    batch = scheduler.schedule()
    assert batch.prefill is a and batch.prefill_end == 100 and batch.decode == []
    assert [s.status for s in (a, b, c)] == [Status.PREFILLING, Status.PREFILLING, Status.WAITING]
    a.num_cached = 100
    assert scheduler.schedule().prefill_end == 200
    a.num_cached = 250
    a.output_ids.append(5)
    scheduler.prompt_cached(a)
    batch = scheduler.schedule()
    assert batch.decode == [a] and batch.prefill is b and batch.prefill_end == 10
    freed = a.slot
    scheduler.remove(a)
    scheduler.schedule()
    assert a.slot is None and c.status is Status.PREFILLING and c.slot == freed


def test_a_new_sequence_joins_running_decodes_at_the_next_step(tokenizer):
    scheduler = Scheduler(cache(), max_num_seqs=4, max_waiting=4, prefill_chunk=512)
    a = seq(tokenizer, 5, "a")
    scheduler.add([a])
    scheduler.schedule()
    a.num_cached, a.output_ids = 5, [9]
    scheduler.prompt_cached(a)
    late = seq(tokenizer, 5, "late")
    scheduler.add([late])
    batch = scheduler.schedule()
    assert batch.decode == [a] and batch.prefill is late


def test_queue_limit_counts_free_slots_and_waiting(tokenizer):
    scheduler = Scheduler(cache(), max_num_seqs=1, max_waiting=1, prefill_chunk=512)
    scheduler.add([seq(tokenizer, 3), seq(tokenizer, 3)])
    with pytest.raises(EngineOverloaded, match="--max-waiting 1"):
        scheduler.add([seq(tokenizer, 3)])


def test_cache_grows_in_blocks_and_shrinks_when_long_sequences_leave():
    kv = cache(max_slots=4, max_len=4096)
    first, second = kv.allocate(), kv.allocate()
    assert (first, second) == (0, 1) and kv.rows_in_use == 2
    kv.reserve(first, 10)
    assert kv.capacity == CAPACITY_BLOCK
    kv.keys[0][first, :, :10] = 1.0
    kv.reserve(second, 3000)
    assert kv.capacity >= 3000 and torch.all(kv.keys[0][first, :, :10] == 1.0)
    kv.free(second)
    assert kv.capacity == CAPACITY_BLOCK and kv.rows_in_use == 1
    assert kv.allocate() == 1  # lowest free slot first
    with pytest.raises(ValueError, match="exceeds the cache limit"):
        kv.reserve(first, 5000)


def test_rows_a_wide_request_grew_are_given_back():
    """NBCE's n + 1 rows grow the cache to many slots; once they leave, a long
    prompt must cost one row of its length, not one per slot left behind
    (that once took a 25k-token prompt after a 17-row NBCE request to 24 GB)."""
    kv = cache(max_slots=32, max_len=8192)
    rows = [kv.allocate() for _ in range(17)]
    for slot in rows:
        kv.reserve(slot, 1600)
    assert kv.num_slots == 32
    for slot in rows:
        kv.free(slot)
    assert kv.num_slots == 1
    long_prompt = kv.allocate()
    kv.reserve(long_prompt, 8000)
    assert kv.num_slots == 1 and kv.bytes_allocated() == 2 * 2 * 1 * 1 * kv.capacity * 4 * 4  # k + v, layers, slot, head
    assert [kv.allocate() for _ in range(3)] == [1, 2, 3] and kv.num_slots == 4  # and they grow again on demand
