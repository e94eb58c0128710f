"""Deltas on their way from the engine thread to the clients' event loops, handed over once per step.

Each hand-over to an asyncio loop from another thread (call_soon_threadsafe)
writes to the loop's wake-up socket and wakes the loop: at 32 rows, one per
delta woke the server's loop 32 times a step. The engine puts every delta of
a step here and sends them in one call per loop, so the loop wakes once and
serves the step's deltas together (the engine's own step is no faster for
it: 47.6 against 47.7 ms, docs/engine.md).
"""

from __future__ import annotations

import asyncio
import threading
from collections import defaultdict
from typing import Callable

from longserve.server.engine.base import SeqDelta


class Outbox:
    def __init__(self, on_closed: Callable[[str], None]):
        self._on_closed = on_closed  # called with a request id whose loop has closed: its client is gone
        self._lock = threading.Lock()
        self._waiting: dict[asyncio.AbstractEventLoop, list[tuple[str, asyncio.Queue, SeqDelta]]] = defaultdict(list)

    def sink(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, request_id: str) -> Callable[[SeqDelta], None]:
        """What a sequence calls with each delta for `queue`, which lives on `loop`."""

        def put(delta: SeqDelta) -> None:
            with self._lock:
                self._waiting[loop].append((request_id, queue, delta))

        return put

    def flush(self) -> None:
        """Send what waits: one call per event loop, its queues filled in the order the deltas came."""
        with self._lock:
            waiting, self._waiting = self._waiting, defaultdict(list)
        for loop, items in waiting.items():
            try:
                loop.call_soon_threadsafe(deliver, [(queue, delta) for _, queue, delta in items])
            except RuntimeError:  # the loop is closed
                for request_id in dict.fromkeys(request_id for request_id, _, _ in items):
                    self._on_closed(request_id)


def deliver(items: list[tuple[asyncio.Queue, SeqDelta]]) -> None:
    for queue, delta in items:
        queue.put_nowait(delta)
