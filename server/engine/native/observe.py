"""The native engine's sequences as Prometheus observations (server/metrics.py); a no-op without metrics."""

from __future__ import annotations

import time

from server.engine.native.sequence import Sequence


class SequenceMetrics:
    def __init__(self, metrics=None):
        self.metrics = metrics

    def queue(self, scheduler) -> None:
        if self.metrics:
            self.metrics.set_queue(running=scheduler.num_running, waiting=len(scheduler.waiting))

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
