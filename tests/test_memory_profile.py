"""The KV budget leaves a step's activations room (server/engine/native/memory_profile.py, step_budget.py): the
start-up passes run on a probe pool, their peak is measured, and the real pool is sized from what is left."""

from __future__ import annotations

import logging
import subprocess
import sys

from longserve.server.engine.native import kv_cache, step_budget
from longserve.server.engine.native.kv_cache import cpu_budget, cuda_budget
from tests.conftest import chat_ids, greedy_text, make_engine, tiny_model

GIB = 2**30


def test_the_budgets_set_the_activations_aside():
    assert cpu_budget(available=20 * GIB, activation_bytes=0) == 10 * GIB  # half of what is available, as before
    assert cpu_budget(available=20 * GIB, activation_bytes=4 * GIB) == 8 * GIB
    assert cpu_budget(available=GIB, activation_bytes=2 * GIB) == 64 << 20  # a floor: the pool's own check speaks then
    # 80 GiB device, 20 GiB in use (weights and others), 0.9 of it ours: 72 - 20 - 6 GiB of activations
    assert cuda_budget(free=60 * GIB, total=80 * GIB, activation_bytes=6 * GIB, utilization=0.9) == 46 * GIB
    assert cuda_budget(free=10 * GIB, total=80 * GIB, activation_bytes=6 * GIB, utilization=0.5) == 0


PEAK_PROBE = """
import torch
from longserve.server.engine.native.memory_profile import PeakMemory
with PeakMemory(torch.device("cpu")) as peak:
    scratch = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched, then freed before the reading
    del scratch
print(peak.bytes)
"""


def test_peak_memory_sees_an_allocation_made_and_freed_inside():
    """In a fresh interpreter: memory this process freed earlier may be reused without resident memory growing
    (what the engine's budget wants: the process holds it already), so only a fresh process shows the rise."""
    out = subprocess.run([sys.executable, "-c", PEAK_PROBE], capture_output=True, text=True, timeout=600, check=True)
    assert int(out.stdout.split()[-1]) >= 60 * 2**20, out.stdout


class FixedPeak:
    """PeakMemory's stand-in: what the passes took is the measuring's business (tested above); here, what the
    engine does with it. The real reading depends on what this process freed before (it may be 0 here)."""

    def __init__(self, device):
        self.bytes = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bytes = 10 << 20


def test_an_engine_sizes_its_pool_after_measuring_a_pass_at_its_step_budget(tokenizer, monkeypatch, caplog):
    passes, sized = [], []
    real_time_a_step, real_cpu_budget = step_budget.time_a_step, kv_cache.cpu_budget
    monkeypatch.setattr(step_budget, "PeakMemory", FixedPeak)
    monkeypatch.setattr(step_budget, "time_a_step",
                        lambda runner, tokens: passes.append((tokens, runner.pool)) or real_time_a_step(runner, tokens))
    monkeypatch.setattr(kv_cache, "cpu_budget",
                        lambda available, activation_bytes: sized.append(activation_bytes) or real_cpu_budget(available, activation_bytes))
    ids = chat_ids(tokenizer, "What is a KV cache?")
    with caplog.at_level(logging.INFO, logger="longserve.engine"):
        engine = make_engine(tiny_model("llama", seed=3), tokenizer, max_model_len=128, max_num_batched_tokens=256,
                             kv_cache_memory=None)
    try:
        # one pass, as large as the probe pool holds (a sequence's 128 tokens); no timed probe: the budget is given
        assert [tokens for tokens, _ in passes] == [128]
        assert passes[0][1] is not engine.pool and passes[0][1].num_tokens == 128  # on the probe pool
        assert engine.runner.pool is engine.pool and engine.runner.backend.num_blocks == engine.pool.num_blocks
        assert sized == [20 << 20]  # 10 MiB for 128 tokens, scaled to the 256-token step
        assert "activations: a step of 256 tokens took 20 MiB" in caplog.text
        measured = greedy_text(engine, ids)
    finally:
        engine.shutdown()
    given = make_engine(tiny_model("llama", seed=3), tokenizer, max_model_len=128, max_num_batched_tokens=256)
    try:
        assert len(passes) == 1  # --kv-cache-memory given: nothing to measure
        assert greedy_text(given, ids) == measured  # the real pool serves as a given one does
    finally:
        given.shutdown()
