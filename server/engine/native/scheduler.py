"""Which sequences run in the next step.

Each step does at most one prefill chunk and one decode over every sequence
whose prompt is cached. A sequence that arrives while others decode is
admitted at the next step (if a slot is free) and joins the decode batch as
soon as its prompt is in the cache: no waiting for the batch to drain, and a
long prompt, cut into chunks, never stalls the sequences already decoding.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from server.engine.base import EngineOverloaded, NeverFits, check_fits
from server.engine.native.kv_cache import SlotCache
from server.engine.native.sequence import Sequence, Status


@dataclass
class Batch:
    prefill: Sequence | None = None
    prefill_end: int = 0  # cache the prompt up to this position in this step
    decode: list[Sequence] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return self.prefill is None and not self.decode


class Scheduler:
    def __init__(self, cache: SlotCache, max_num_seqs: int, max_waiting: int, prefill_chunk: int):
        self.cache = cache
        self.max_num_seqs = max_num_seqs
        self.max_waiting = max_waiting
        self.prefill_chunk = prefill_chunk
        self.waiting: deque[Sequence] = deque()
        self.prefilling: deque[Sequence] = deque()
        self.decoding: list[Sequence] = []
        self.parked: list[Sequence] = []  # NBCE rows waiting for the rest of their group

    @property
    def num_running(self) -> int:
        return len(self.prefilling) + len(self.decoding) + len(self.parked)

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.decoding or self.parked)

    def add(self, seqs: list[Sequence]) -> None:
        """Queue `seqs`, or refuse them all if the batch and the waiting queue cannot hold them.

        Free batch slots count as room too: admission happens at the next
        step, so counting only the queue would depend on the step's timing.
        """
        group = seqs[0].group if seqs else None
        if group is not None and len(group.rows) > self.max_num_seqs:
            raise NeverFits(f"{len(group.rows)} rows decoded together do not fit --max-num-seqs {self.max_num_seqs}")
        check_fits(len(seqs), self.max_num_seqs, self.max_waiting)
        room = self.max_num_seqs + self.max_waiting - self.num_running - len(self.waiting)
        if len(seqs) > room:
            raise EngineOverloaded(
                f"the server is full: {self.num_running} sequences running (--max-num-seqs {self.max_num_seqs}) "
                f"and {len(self.waiting)} waiting (--max-waiting {self.max_waiting}); retry later"
            )
        self.waiting.extend(seqs)

    def schedule(self) -> Batch:
        while self.waiting:
            group = self.waiting[0].group  # the rows of an NBCE request come in together, or wait together
            size = len(group.rows) if group is not None else 1
            if self.num_running + size > self.max_num_seqs:
                break
            for _ in range(size):
                seq = self.waiting.popleft()
                seq.slot = self.cache.allocate()
                seq.status = Status.PREFILLING
                if group is not None and group.shares_prompt and seq is not group.leader:
                    self.parked.append(seq)  # a beam: its cache rows are copied from the leader's
                else:
                    self.prefilling.append(seq)

        batch = Batch(decode=list(self.decoding))
        for seq in batch.decode:
            self.cache.reserve(seq.slot, seq.num_cached + 1)
        if self.prefilling:
            seq = self.prefilling[0]
            batch.prefill = seq
            batch.prefill_end = min(len(seq.prompt_ids), seq.num_cached + self.prefill_chunk)
            self.cache.reserve(seq.slot, batch.prefill_end)
        return batch

    def park(self, seq: Sequence) -> None:
        """An NBCE row with its prompt cached waits, holding its slot, for the rest of its group."""
        self.prefilling.remove(seq)
        self.parked.append(seq)

    def prompt_cached(self, seq: Sequence) -> None:
        """`seq` has its whole prompt in the cache and its first token: it decodes from now on."""
        for queue in (self.prefilling, self.parked):
            if seq in queue:
                queue.remove(seq)
        seq.status = Status.DECODING
        self.decoding.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take a finished or aborted sequence out of every queue and free its slot."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.prefilling:
            self.prefilling.remove(seq)
        if seq in self.decoding:
            self.decoding.remove(seq)
        if seq in self.parked:
            self.parked.remove(seq)
        if seq.slot is not None:
            self.cache.free(seq.slot)
            seq.slot = None
