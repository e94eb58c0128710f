"""Scheduler and block bookkeeping, without a model: budgets, admission, preemption, prefix hits."""

from __future__ import annotations

import pytest
import torch

from longserve.server.engine.base import EngineOverloaded, NeverFits, SamplingParams
from longserve.server.engine.native.block_manager import BlockManager
from longserve.server.engine.native.kv_cache import BLOCK_SIZE, KvPool
from longserve.server.engine.native.kv_quant import cache_format
from longserve.server.engine.native.positions import SequencePositions
from longserve.server.engine.native.scheduler import Scheduler
from longserve.server.engine.native.sequence import Sequence, Status
from longserve.patches.nbce import NbceParams
from longserve.patches.rope import RopeTable
from longserve.server.engine.native.nbce_group import NbceGroup

PLAIN = SequencePositions(RopeTable(torch.tensor([1.0, 0.5])), logn=False)
SCALED = SequencePositions(RopeTable(torch.tensor([0.25, 0.125])), logn=False)


def blocks(num_blocks=64, prefix_caching=True, cache_dtype="auto") -> BlockManager:
    pool = KvPool(num_layers=1, num_kv_heads=1, head_dim=4, num_blocks=num_blocks, dtype=torch.float32,
                  device=torch.device("cpu"), near_keys=False, cache=cache_format(cache_dtype))
    return BlockManager(pool, prefix_caching=prefix_caching)


def scheduler(num_blocks=64, max_num_seqs=4, max_waiting=8, budget=64, chunk=32, prefix_caching=True,
              cache_dtype="auto") -> Scheduler:
    return Scheduler(blocks(num_blocks, prefix_caching, cache_dtype), max_num_seqs, max_waiting, budget, chunk,
                     max_model_len=num_blocks * BLOCK_SIZE)


def seq(tokenizer, prompt_len: int, name: str = "r", max_tokens: int = 16, positions=PLAIN, first: int = 3) -> Sequence:
    return Sequence(name, 0, list(range(first, first + prompt_len)), SamplingParams(max_tokens=max_tokens), lambda d: None,
                    tokenizer.backend_tokenizer, frozenset(), positions=positions)


def run(scheduler: Scheduler):
    """Schedule one step and report it computed, as the engine does; decoding rows take token 7."""
    step = scheduler.schedule()
    assert step.num_tokens <= scheduler.max_batched_tokens
    scheduler.computed(step)
    for chunk in step.chunks:
        if chunk.ends_prompt and not chunk.seq.output_ids and chunk.seq.group is None:
            chunk.seq.output_ids.append(7)
    for s in step.decode:
        s.output_ids.append(7)
    return step


def test_decodes_come_first_and_prefill_chunks_share_the_rest_of_the_budget(tokenizer):
    sched = scheduler(budget=64, chunk=32)
    long, short_a, short_b = seq(tokenizer, 100, "long"), seq(tokenizer, 10, "a"), seq(tokenizer, 10, "b")
    sched.add([long, short_a, short_b])
    step = run(sched)
    assert [(c.seq.request_id, c.start, c.end) for c in step.chunks] == [("long", 0, 32), ("a", 0, 10), ("b", 0, 10)]
    step = run(sched)  # a and b decode; the long prompt goes on in chunks
    assert step.decode == [short_a, short_b]
    assert [(c.seq.request_id, c.start, c.end) for c in step.chunks] == [("long", 32, 64)]
    assert all(s.status is Status.DECODING for s in (short_a, short_b)) and long.status is Status.PREFILLING


def test_a_prompt_already_prefilling_leaves_three_quarters_of_the_step_to_requests_that_wait(tokenizer):
    sched = scheduler(budget=64, chunk=64)
    long = seq(tokenizer, 400, "long")
    sched.add([long])
    assert [(c.seq.request_id, c.end - c.start) for c in run(sched).chunks] == [("long", 64)]  # alone: all of it
    chat = seq(tokenizer, 40, "chat", first=1000)  # no prefix in common with the long prompt
    sched.add([chat])
    step = run(sched)  # the chat does not wait for the long prompt's prefill
    assert [(c.seq.request_id, c.start, c.end) for c in step.chunks] == [("long", 64, 80), ("chat", 0, 40)]
    step = run(sched)  # nobody waits: the long prompt takes the rest of the budget beside the chat's decode
    assert step.decode == [chat] and [(c.seq.request_id, c.start, c.end) for c in step.chunks] == [("long", 80, 143)]
    rows = [seq(tokenizer, 20, "nbce", first=2000 + 100 * i) for i in range(3)]
    NbceGroup(rows, NbceParams())
    sched.add(rows)  # 3 rows beside the 2 running do not fit --max-num-seqs 4: no share is kept for them
    step = run(sched)
    assert [(c.seq.request_id, c.start, c.end) for c in step.chunks] == [("long", 143, 206)]


def test_admission_is_bounded_by_max_num_seqs_and_free_blocks(tokenizer):
    sched = scheduler(num_blocks=8, max_num_seqs=2, budget=256, chunk=256)
    a, b, c = seq(tokenizer, 40, "a"), seq(tokenizer, 40, "b"), seq(tokenizer, 10, "c")
    sched.add([a, b, c])
    run(sched)
    assert a.status is Status.PREFILLING or a.status is Status.DECODING
    assert c.status is Status.WAITING  # --max-num-seqs 2
    assert len(a.block_table) == 3 and len(b.block_table) == 3  # 40 tokens: 3 blocks of 16
    sched.remove(a)
    run(sched)
    assert c.status is not Status.WAITING and sched.blocks.in_use == len(b.block_table) + len(c.block_table)


def test_memory_pressure_preempts_the_youngest_and_everything_completes(tokenizer):
    sched = scheduler(num_blocks=6, max_num_seqs=4, budget=64, chunk=64)  # 96 token slots
    seqs = [seq(tokenizer, 20, f"s{i}", max_tokens=40) for i in range(3)]  # 3 x 60 tokens: they cannot all be held
    sched.add(seqs)
    for _ in range(400):
        if not sched.has_work():
            break
        run(sched)
        assert sched.blocks.in_use <= 6
        for s in seqs:
            if len(s.output_ids) >= s.params.max_tokens and s.status is not Status.FINISHED:
                sched.remove(s)
    assert not sched.has_work() and sched.num_preempted > 0
    assert all(len(s.output_ids) == 40 for s in seqs)  # a preempted sequence is recomputed, never cut short


def test_a_row_placed_in_the_step_is_never_preempted_and_a_starved_requests_rows_leave_the_step(tokenizer):
    """A group row out of blocks used to preempt the youngest plain row even when that row was already in the step's
    decode list: its emptied block table was padded with block 0, and its keys and values overwrote a live or cached
    block. Now the group row starves (its request fails) and nothing of it stays in the step."""
    def decoding(row, cached: int):
        assert sched.blocks.admit(row, cached + 1)
        row.num_cached, row.status = cached, Status.DECODING
        sched.running.append(row)

    sched = scheduler(num_blocks=3, budget=64, chunk=64)
    plain = seq(tokenizer, 10, "plain")
    rows = [seq(tokenizer, 10, "group"), seq(tokenizer, 10, "group")]
    NbceGroup(rows, NbceParams())  # group rows are never preempted; this one has no reserve left
    decoding(plain, 10)  # writes position 10: inside its block
    decoding(rows[0], 10)  # the same
    decoding(rows[1], 15)
    rows[1].num_cached = 16  # writes position 16: needs a second block, and all 3 are taken
    step = sched.schedule()
    assert step.starved == [rows[1]]
    assert step.decode == [plain] and plain.status is Status.DECODING and len(plain.block_table) == 1  # kept, not emptied
    assert rows[0] not in step.decode  # its request fails with rows[1]'s: it must not write either
    assert sched.num_preempted == 0


def test_a_group_that_can_never_fit_the_pool_is_refused_and_one_that_fits_reserves_its_growth(tokenizer):
    sched = scheduler(num_blocks=16, budget=256, chunk=256)  # 256 tokens
    rows = [seq(tokenizer, 60, "nbce", max_tokens=16) for _ in range(4)]  # 4 x 4 prompt blocks + 4 x 3 to grow into
    NbceGroup(rows, NbceParams())
    with pytest.raises(NeverFits, match="--kv-cache-memory"):
        sched.add(rows)
    rows = [seq(tokenizer, 30, "nbce", max_tokens=16) for _ in range(3)]
    group = NbceGroup(rows, NbceParams())
    sched.add(rows)
    run(sched)
    assert all(row.status is Status.PARKED for row in rows)  # prompts cached; the group decodes once all are
    assert group.reserve == 3 * 3 and sched.blocks.available == 16 - 3 * 2 - 9
    for row in rows:
        sched.remove(row)
    assert sched.blocks.reserved == 0 and sched.blocks.in_use == 0


def test_queue_limit_counts_free_slots_and_waiting(tokenizer):
    sched = scheduler(max_num_seqs=1, max_waiting=1)
    sched.add([seq(tokenizer, 3), seq(tokenizer, 3)])
    with pytest.raises(EngineOverloaded, match="--max-waiting 1"):
        sched.add([seq(tokenizer, 3)])


def test_prefix_hits_need_full_computed_blocks_and_the_same_positions(tokenizer):
    sched = scheduler(max_num_seqs=8, budget=256, chunk=256)
    first = seq(tokenizer, 50, "first")
    sched.add([first])
    run(sched)
    assert len(sched.blocks.by_hash) == 3  # 50 tokens: 3 full blocks registered
    again, scaled, shorter = seq(tokenizer, 50, "again"), seq(tokenizer, 50, "scaled", positions=SCALED), seq(tokenizer, 33, "33")
    other = seq(tokenizer, 50, "other", first=4)
    sched.add([again, scaled, shorter, other])
    run(sched)
    assert again.cached_tokens == 48 and again.block_table[:3] == first.block_table[:3]
    assert scaled.cached_tokens == 0  # another rotary table: its keys differ
    assert shorter.cached_tokens == 32  # the last token is always computed: 2 of its 2 full blocks hit, position 32 is new
    assert other.cached_tokens == 0
    assert sched.blocks.queries == 50 + 50 + 50 + 33 + 50 and sched.blocks.hits == 48 + 32


def test_block_digests_chain_sha256_over_the_parent_the_tokens_the_positions_and_the_cache_format(tokenizer):
    """The prefix cache's keys, recomputed here from their definition; a block equal to a cached one in its tokens but
    not in what comes before it never hits. Python's tuple hash they replace is unsalted for ints and tuples:
    hash(-1) == hash(-2), so (-1, tokens, key) and (-2, tokens, key) collided, and a crafted prompt could collide."""
    import hashlib

    assert hash((-1, (5, 6), PLAIN.cache_key)) == hash((-2, (5, 6), PLAIN.cache_key))  # why not Python's hash
    sched = scheduler(max_num_seqs=8, budget=256, chunk=256)
    first = seq(tokenizer, 50, "first")
    sched.add([first])
    run(sched)
    want, parent = [], bytes(32)
    position = hashlib.sha256(repr(("auto", PLAIN.cache_key)).encode()).digest()
    for index in range(3):
        tokens = first.all_ids[index * BLOCK_SIZE:(index + 1) * BLOCK_SIZE]
        parent = hashlib.sha256(parent + b"".join(t.to_bytes(8, "little", signed=True) for t in tokens) + position).digest()
        want.append(parent)
    assert sched.blocks.by_hash == {digest: block for digest, block in zip(want, first.block_table)}
    other_head = seq(tokenizer, 50, "other head")
    other_head.prompt_ids[:BLOCK_SIZE] = range(1000, 1000 + BLOCK_SIZE)  # blocks 1 and 2 equal first's, block 0 does not
    assert other_head.prompt_ids[BLOCK_SIZE:] == first.prompt_ids[BLOCK_SIZE:]
    sched.add([other_head])
    run(sched)
    assert other_head.cached_tokens == 0


def test_an_int8_cache_shares_its_own_blocks_and_never_names_them_as_a_float_cache_does(tokenizer):
    """The cache's format is part of a block's identity: the same prompt and positions give other digests in an
    int8 pool than in a float one, so no registry could hand one's blocks to the other; within the int8 pool a
    second request with the same prompt takes the first one's blocks."""
    digests = {}
    for cache_dtype in ("auto", "int8", "fp8_e5m2"):
        sched = scheduler(max_num_seqs=8, budget=256, chunk=256, cache_dtype=cache_dtype)
        first, second = seq(tokenizer, 50, "first"), seq(tokenizer, 50, "second")
        sched.add([first])
        run(sched)
        sched.add([second])
        run(sched)
        assert second.cached_tokens == 3 * BLOCK_SIZE and second.block_table[:3] == first.block_table[:3]
        digests[cache_dtype] = set(sched.blocks.by_hash)
    assert len(digests["auto"]) == 3
    assert not digests["auto"] & digests["int8"] and not digests["int8"] & digests["fp8_e5m2"]


def test_cached_blocks_are_evicted_least_recently_used_when_fresh_ones_are_needed(tokenizer):
    sched = scheduler(num_blocks=8, budget=256, chunk=256)
    a = seq(tokenizer, 64, "a")
    sched.add([a])
    run(sched)
    sched.remove(a)
    assert sched.blocks.in_use == 0 and len(sched.blocks.cached_free) == 4
    b = seq(tokenizer, 100, "b", first=1000)  # needs 7 blocks: 4 never used, 3 evicted from a's
    sched.add([b])
    run(sched)
    assert len(b.block_table) == 7 and len(sched.blocks.by_hash) <= 1 + 6
    again = seq(tokenizer, 64, "again")
    sched.remove(b)
    sched.add([again])
    run(sched)
    assert again.cached_tokens <= 16  # a's tail blocks went first; at most its head survived


def test_beam_rows_share_blocks_and_copy_one_before_writing(tokenizer):
    bm = blocks()
    leader, follower = seq(tokenizer, 20, "beam"), seq(tokenizer, 20, "beam")
    assert bm.admit(leader, 20)
    leader.num_cached = 20
    bm.fork([follower], [leader])
    assert follower.block_table == leader.block_table and bm.blocks[leader.block_table[1]].ref_count == 2
    follower.num_cached = 20
    assert bm.needs_block(follower)  # position 20 is in a shared block
    bm.grow(follower)
    assert follower.block_table[0] == leader.block_table[0] and follower.block_table[1] != leader.block_table[1]
    bm.free(follower)
    bm.free(leader)
    assert bm.in_use == 0
