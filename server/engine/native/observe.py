"""The native engine's sequences as Prometheus observations (server/engine/metrics.py); a no-op without metrics."""

from __future__ import annotations

import time

from longserve.server.engine.native.sequence import Sequence


class SequenceMetrics:
    def __init__(self, metrics=None):
        self.metrics = metrics
        self._counted = (0, 0, 0)  # prefix-cache queries, hits and preemptions already exported

    def watch(self, blocks, pool) -> None:
        if self.metrics:
            self.metrics.watch_kv_cache(lambda: blocks.usage)
            self.metrics.set_kv_cache_size(pool.num_tokens, pool.cache.name)

    def queue(self, scheduler) -> None:
        if not self.metrics:
            return
        self.metrics.set_queue(running=scheduler.num_running, waiting=len(scheduler.waiting))
        blocks = scheduler.blocks
        queries, hits, preempted = blocks.queries, blocks.hits, scheduler.num_preempted
        self.metrics.count_prefix_cache(queries - self._counted[0], hits - self._counted[1])
        self.metrics.count_preemptions(preempted - self._counted[2])
        self._counted = (queries, hits, preempted)

    def token(self, seq: Sequence, previous: float | None) -> None:
        """`seq` took a token; `previous` is when it took the one before (None: this is its first)."""
        if not self.metrics:
            return
        if previous is None:
            self.metrics.observe_first_token(seq.first_token_time - seq.arrival_time)
        else:
            self.metrics.observe_inter_token(seq.last_token_time - previous)

    def finished(self, seq: Sequence) -> None:
        if self.metrics:
            self.metrics.observe_finished(
                e2e=time.perf_counter() - seq.arrival_time,
                prompt_tokens=len(seq.prompt_ids),
                generation_tokens=len(seq.output_ids),
                reason=seq.finish_reason or "abort",
            )
