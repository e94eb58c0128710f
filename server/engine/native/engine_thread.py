"""The thread that runs all of the native engine's torch work.

Loading, the start-up passes and every step run on the engine's own thread,
and nowhere else. libgomp keeps each thread's OpenMP workers for the life of
that thread, and once a process holds more of them than it has cores, its
workers sleep at the end of every parallel region instead of spinning (its
"throttled" spin count), so each of a step's hundreds of small ops paid a
wake-up. With the model loaded on the caller's thread, the bundled model's
121 one-row linears took 24 ms a pass on the engine's thread against 14 ms on
the thread that loaded it (2 threads, bfloat16, a throwaway timing), and
one-row steps had been pinned to one thread to get 26 ms. Built here, every
step runs on all cores: docs/engine.md has the figures.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Callable


def start_engine_thread(build: Callable[[], None], loop: Callable[[], None], name: str) -> threading.Thread:
    """Start a daemon thread that runs `build()`, then `loop()`; return it once `build` returned, or raise
    what it raised (the thread then ends)."""
    built: Future[None] = Future()

    def run() -> None:
        try:
            build()
        except BaseException as exc:  # the caller raises it; nothing is left running
            built.set_exception(exc)
            return
        built.set_result(None)
        loop()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    built.result()
    return thread
