"""Which tokens run in the next step, and every change of a sequence's state.

Each step has a budget of --max-num-batched-tokens tokens (vLLM's name):
1. every decoding sequence takes one, oldest first; one that needs a block
   when none is free makes room by preempting the youngest running sequence
   (its blocks are freed; it waits at the head of the queue and is computed
   again later, mostly from the prefix cache), as vLLM does;
2. sequences mid-prefill take chunks of at most --prefill-chunk tokens each,
   in arrival order, while budget is left: several prompts share one forward
   pass, and a long prompt never holds a short one back by more than a chunk;
3. waiting sequences are admitted while the budget, --max-num-seqs and the
   free blocks allow (the rows of one NBCE or beam request together), and
   start their first chunk in the same step.

States: WAITING -> PREFILLING -> DECODING -> FINISHED, with PARKED for rows of
a group waiting for the rest of it (NBCE rows with their prompt cached, beam
rows before they share the leader's prompt) and back to WAITING when
preempted. The engine runs a step, then reports it here (`computed`).

Group rows (NBCE, beams) are never preempted: at admission they reserve the
blocks they can grow into, so they always finish.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from longserve.server.engine.base import EngineOverloaded, NeverFits, check_fits
from longserve.server.engine.native.block_manager import BlockManager, blocks_for
from longserve.server.engine.native.sequence import Sequence, Status


@dataclass
class Chunk:
    seq: Sequence
    start: int
    end: int
    ends_prompt: bool = True  # the chunk reaches the sequence's prefill target: logits to sample from
    every_position: bool = False  # scores of every position (prompt_logprobs)


@dataclass
class Step:
    decode: list[Sequence] = field(default_factory=list)
    chunks: list[Chunk] = field(default_factory=list)
    starved: list[Sequence] = field(default_factory=list)  # group rows out of blocks with nothing to preempt: they fail

    @property
    def num_tokens(self) -> int:
        return len(self.decode) + sum(chunk.end - chunk.start for chunk in self.chunks)

    @property
    def empty(self) -> bool:
        return not self.decode and not self.chunks


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_waiting: int, max_batched_tokens: int,
                 prefill_chunk: int, max_model_len: int):
        if max_batched_tokens < max_num_seqs:
            raise ValueError(f"--max-num-batched-tokens {max_batched_tokens} is less than --max-num-seqs {max_num_seqs}: "
                             "a step could not decode every running sequence; raise it")
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_waiting = max_waiting
        self.max_batched_tokens = max_batched_tokens
        self.prefill_chunk = prefill_chunk
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last is the youngest
        self.num_preempted = 0

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- arrival -------------------------------------------------------------

    def add(self, seqs: list[Sequence]) -> None:
        """Queue `seqs`, or refuse them all: a 400 if they could never run, a 429 if the queue is full.

        Free batch slots count as room too: admission happens at the next
        step, so counting only the queue would depend on the step's timing.
        """
        group = seqs[0].group if seqs else None
        if group is not None and len(group.rows) > self.max_num_seqs:
            raise NeverFits(f"{len(group.rows)} rows decoded together do not fit --max-num-seqs {self.max_num_seqs}")
        check_fits(len(seqs), self.max_num_seqs, self.max_waiting)
        self._check_memory(seqs)
        room = self.max_num_seqs + self.max_waiting - self.num_running - len(self.waiting)
        if len(seqs) > room:
            raise EngineOverloaded(
                f"the server is full: {self.num_running} sequences running (--max-num-seqs {self.max_num_seqs}) "
                f"and {len(self.waiting)} waiting (--max-waiting {self.max_waiting}); retry later"
            )
        self.waiting.extend(seqs)

    def _check_memory(self, seqs: list[Sequence]) -> None:
        pool = self.blocks.pool.num_blocks
        group = seqs[0].group
        if group is None:
            longest = max(min(len(seq.prompt_ids) + seq.params.max_tokens, self.max_model_len) for seq in seqs)
            needed = blocks_for(longest)
        else:
            needed = sum(blocks_for(len(seq.prompt_ids)) for seq in self._prefilled(seqs)) + self._growth(group)
        if needed > pool:
            raise NeverFits(f"this request needs {needed * 16} tokens of KV cache and the pool holds {pool * 16} "
                            "(--kv-cache-memory); lower max_tokens, shorten the prompt, or raise --kv-cache-memory")

    def _growth(self, group) -> int:
        """The blocks a group's rows may still take after admission: every row's output, and a copied block."""
        leader = group.leader
        tokens = min(leader.params.max_tokens, max(self.max_model_len - len(leader.prompt_ids), 0)) + 1
        return len(group.rows) * (blocks_for(tokens) + 1)

    @staticmethod
    def _prefilled(seqs: list[Sequence]) -> list[Sequence]:
        """The rows that compute their own prompt (beam rows share the leader's)."""
        group = seqs[0].group
        return [seq for seq in seqs if group is None or not group.shares_prompt or seq is group.leader]

    # ---- one step ------------------------------------------------------------

    def schedule(self) -> Step:
        step = Step()
        budget = self.max_batched_tokens
        for seq in [s for s in self.running if s.status is Status.DECODING]:
            if seq.status is not Status.DECODING:  # preempted to make room for an older one
                continue
            if budget == 0:
                break
            if not self._make_room(seq, step):
                continue
            self.blocks.grow(seq)
            step.decode.append(seq)
            budget -= 1
        if step.starved:  # their requests fail before the step runs: none of their rows may write into it
            failing = {seq.request_id for seq in step.starved}
            budget += sum(1 for seq in step.decode if seq.request_id in failing)
            step.decode = [seq for seq in step.decode if seq.request_id not in failing]
        # While requests wait with room to run, prompts already prefilling take a quarter of what is left: a long
        # prompt's chunk would otherwise fill every step (budget ~ chunk on a slow CPU) and a chat sent beside it
        # would wait for its whole prefill. Alone, a prompt takes the whole budget.
        waits_with_room = bool(self.waiting) and self._fits(self._head_unit())
        share = max(1, budget // 4) if waits_with_room else budget
        for seq in self.running:
            if budget == 0 or share == 0:
                break
            if seq.status is Status.PREFILLING:
                taken = self._chunk(seq, min(budget, share), step)
                budget, share = budget - taken, share - taken
        while self.waiting and budget > 0:
            unit = self._admit()
            if unit is None:
                break
            for seq in unit:
                if seq.status is Status.PREFILLING and budget > 0:
                    budget -= self._chunk(seq, budget, step)
        return step

    def _make_room(self, seq: Sequence, step: Step) -> bool:
        """Free blocks until `seq` can write its next token; False when `seq` itself had to give way. A row already
        placed in this step is never the victim: its emptied block table would send its keys into block 0."""
        while not self.blocks.can_grow(seq):
            victim = next((s for s in reversed(self.running) if s.group is None and s not in step.decode), None)
            if victim is None:  # only group rows hold blocks; their reserve should have covered this
                step.starved.append(seq)
                return False
            self.preempt(victim)
            if victim is seq:
                return False
        return True

    def _chunk(self, seq: Sequence, budget: int, step: Step) -> int:
        start, target = seq.num_cached, seq.prefill_target
        size = min(target - start, self.prefill_chunk, budget)
        if size <= 0:
            return 0
        scores = seq.params.prompt_logprobs is not None and not seq.output_ids
        step.chunks.append(Chunk(seq, start, start + size, ends_prompt=start + size == target, every_position=scores))
        return size

    def _head_unit(self) -> list[Sequence]:
        """The rows of the request at the head of the queue: all of its group's, or its one sequence."""
        first = self.waiting[0]
        return list(first.group.rows) if first.group is not None else [first]

    def _fits(self, unit: list[Sequence]) -> bool:
        """Whether `unit` can run beside the running sequences within --max-num-seqs."""
        return self.num_running + len(unit) <= self.max_num_seqs

    def _admit(self) -> list[Sequence] | None:
        """Admit the request at the head of the queue (all its rows) if it fits now; its rows, or None."""
        unit = self._head_unit()
        group = unit[0].group
        if not self._fits(unit):
            return None
        prefilled = self._prefilled(unit)
        admitted = []
        for seq in prefilled:
            if not self.blocks.admit(seq, seq.prefill_target):
                break
            admitted.append(seq)
        if len(admitted) < len(prefilled) or (group is not None and not self.blocks.reserve(group, self._growth(group))):
            for seq in admitted:
                self.blocks.free(seq)
                seq.num_cached = seq.cached_tokens = 0
            return None
        for seq in unit:
            self.waiting.remove(seq)
            seq.status = Status.PREFILLING if seq in prefilled else Status.PARKED
            self.running.append(seq)
        for seq in prefilled:
            self.blocks.count_lookup(seq)
        return unit

    # ---- after a step --------------------------------------------------------

    def computed(self, step: Step) -> None:
        """The step ran: its tokens are in the cache. Prompts that ended decode next (group rows park)."""
        for seq in step.decode:
            seq.num_cached += 1
            self.blocks.cache_computed(seq, seq.num_cached - 1, seq.num_cached)
        for chunk in step.chunks:
            seq = chunk.seq
            seq.num_cached = chunk.end
            self.blocks.cache_computed(seq, chunk.start, chunk.end)
            if chunk.ends_prompt:
                seq.status = Status.PARKED if seq.group is not None and not seq.output_ids else Status.DECODING

    def start_decoding(self, seqs: list[Sequence]) -> None:
        """Rows of a group whose prompts are all cached (and beams now sharing the leader's) decode together."""
        for seq in seqs:
            seq.status = Status.DECODING

    def fork(self, rows: list[Sequence], sources: list[Sequence]) -> None:
        """Beam rows continue other rows' caches."""
        self.blocks.fork(rows, sources)
        for row, source in zip(rows, sources):
            row.num_cached = source.num_cached

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.num_cached = 0
        seq.status = Status.WAITING
        seq.preemptions += 1
        self.num_preempted += 1
        self.waiting.appendleft(seq)

    def finish(self, seqs: list[Sequence], reason: str, override: bool = False) -> None:
        """Every sequence ends here, finished, failed or aborted: its finish reason (the first one set wins,
        unless `override`: an error), out of every queue, its blocks freed."""
        for seq in seqs:
            seq.finish(reason, override)
            self.remove(seq)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out of every queue and free its blocks (finish() is how a sequence ends)."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.running:
            self.running.remove(seq)
        self.blocks.free(seq)
        if seq.group is not None and not any(row in self.running for row in seq.group.rows):
            self.blocks.unreserve(seq.group)
        seq.status = Status.FINISHED
