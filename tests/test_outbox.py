"""The outbox: deltas sent from the engine thread once per step, one call per client event loop."""

from __future__ import annotations

import asyncio
import threading

from longserve.server.engine.base import SeqDelta
from longserve.server.engine.native.outbox import Outbox


def delta(index: int, text: str) -> SeqDelta:
    return SeqDelta(index=index, text=text, token_ids=[], logprobs=None, finish_reason=None, completion_tokens=0)


def test_each_loop_gets_its_deltas_in_order_in_one_call_and_nothing_before_the_flush():
    outbox = Outbox(on_closed=lambda request_id: None)
    loops = [asyncio.new_event_loop() for _ in range(2)]
    calls = {loop: 0 for loop in loops}
    for loop in loops:
        original = loop.call_soon_threadsafe

        def counted(*args, loop=loop, original=original):
            calls[loop] += 1
            return original(*args)

        loop.call_soon_threadsafe = counted
    queues = [asyncio.Queue() for _ in range(3)]
    sinks = [outbox.sink(loops[0], queues[0], "a"), outbox.sink(loops[0], queues[1], "b"),
             outbox.sink(loops[1], queues[2], "c")]
    for step in range(3):
        for which, sink in enumerate(sinks):
            sink(delta(which, f"{step}"))
    assert all(queue.empty() for queue in queues) and sum(calls.values()) == 0

    def flush_from_another_thread():  # as the engine thread does
        outbox.flush()

    thread = threading.Thread(target=flush_from_another_thread)
    thread.start()
    thread.join()
    assert calls == {loops[0]: 1, loops[1]: 1}
    for loop in loops:
        loop.run_until_complete(asyncio.sleep(0))
    for which, queue in enumerate(queues):
        got = [queue.get_nowait() for _ in range(queue.qsize())]
        assert [(d.index, d.text) for d in got] == [(which, "0"), (which, "1"), (which, "2")]
    for loop in loops:
        loop.close()


def test_a_closed_loop_aborts_its_requests_once_and_the_others_still_get_theirs():
    closed_for = []
    outbox = Outbox(on_closed=closed_for.append)
    gone, alive = asyncio.new_event_loop(), asyncio.new_event_loop()
    gone.close()
    queue = asyncio.Queue()
    for request_id in ("x", "x", "y"):
        outbox.sink(gone, asyncio.Queue(), request_id)(delta(0, "lost"))
    outbox.sink(alive, queue, "z")(delta(0, "kept"))
    outbox.flush()
    alive.run_until_complete(asyncio.sleep(0))
    assert closed_for == ["x", "y"]
    assert queue.get_nowait().text == "kept"
    outbox.flush()  # nothing waits now
    assert closed_for == ["x", "y"]
    alive.close()
