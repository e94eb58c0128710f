"""All of the native engine's torch work runs on its own thread (engine_thread.py says why)."""

from __future__ import annotations

import asyncio
import threading

import pytest

import longserve.server.engine.native.engine as engine_module
from longserve.server.engine.native.engine_thread import start_engine_thread
from longserve.server.engine.native.model_runner import ModelRunner
from tests.conftest import running_engine
from tests.test_engine import engine_greedy


def test_build_then_loop_on_one_new_thread():
    seen, looped = [], threading.Event()
    thread = start_engine_thread(lambda: seen.append(threading.current_thread()),
                                 lambda: (seen.append(threading.current_thread()), looped.set()), "probe")
    assert looped.wait(timeout=60)
    thread.join(timeout=60)
    assert seen == [thread, thread] and thread is not threading.current_thread()
    assert thread.daemon and thread.name == "probe"


def test_a_failed_build_raises_in_the_caller_and_never_loops():
    looped = []

    def build():
        raise ValueError("this model caps its logits")

    with pytest.raises(ValueError, match="caps its logits"):
        start_engine_thread(build, lambda: looped.append(True), "probe")
    assert looped == []


class RecordingRunner(ModelRunner):
    """ModelRunner that notes the thread of its weight packing and of every forward pass."""
    threads: list[threading.Thread] = []

    def __init__(self, *args, **kwargs):
        RecordingRunner.threads.append(threading.current_thread())
        super().__init__(*args, **kwargs)

    def run(self, decode, chunks):
        RecordingRunner.threads.append(threading.current_thread())
        return super().run(decode, chunks)


def test_the_engine_packs_weights_and_steps_on_its_own_thread(tiny_llama, tokenizer, monkeypatch):
    monkeypatch.setattr(engine_module, "ModelRunner", RecordingRunner)
    RecordingRunner.threads = []
    with running_engine(tiny_llama, tokenizer, max_num_seqs=2) as engine:
        asyncio.run(engine_greedy(engine, [[1, 5, 9, 13]], 3, ignore_eos=True))
        recorded = list(RecordingRunner.threads)
    assert len(recorded) >= 4  # the runner, then at least the prefill and two decode steps
    assert set(recorded) == {engine._thread}
    assert engine._thread is not threading.current_thread()
