"""The default step budget (server/engine/native/step_budget.py): sized from a timed forward pass so that a step
takes about half a second, within [--max-num-seqs, 2048], and a given --max-num-batched-tokens wins. The timings
here are stand-ins passed to the sizing, so nothing depends on this machine's speed."""

from __future__ import annotations

import logging

from longserve.server.engine.config import DEFAULT_STEP_TOKENS
from longserve.server.engine.native import step_budget
from longserve.server.engine.native.step_budget import STEP_TARGET_SECONDS, budget_for
from tests.conftest import make_engine, tiny_model


def test_the_budget_fits_the_target_step_time_in_whole_blocks_within_its_bounds():
    assert budget_for(512, 0.05, least=16) == DEFAULT_STEP_TOKENS  # 5,120 tokens would fit in 0.5 s: at most 2,048
    assert budget_for(512, 0.25, least=16) == 1024
    assert budget_for(512, 2.0, least=16) == 128  # a slow machine: a quarter of the probe
    assert budget_for(512, 3.0, least=16) == 80  # 85.3 tokens, down to a whole block
    assert budget_for(512, 1000.0, least=32) == 32  # never below one decode step of --max-num-seqs rows
    assert budget_for(512, 0.0, least=16) == DEFAULT_STEP_TOKENS
    assert STEP_TARGET_SECONDS == 0.5


def test_an_engine_without_a_budget_sizes_it_from_a_timed_pass_and_says_so(tokenizer, monkeypatch, caplog):
    timed = []

    def slow_pass(runner, tokens):  # the real pass runs; the time it reports is a stand-in for a slow machine
        real = real_time_a_step(runner, tokens)
        timed.append((tokens, real))
        return 4.0

    real_time_a_step = step_budget.time_a_step
    monkeypatch.setattr(step_budget, "time_a_step", slow_pass)
    with caplog.at_level(logging.INFO, logger="longserve.engine"):
        engine = make_engine(tiny_model("llama", seed=3), tokenizer, max_model_len=1024, max_num_seqs=4,
                             max_num_batched_tokens=None)
    try:
        assert timed and timed[0][0] == 512 and timed[0][1] > 0
        assert engine.scheduler.max_batched_tokens == budget_for(512, 4.0, least=4) == 64
        assert "--max-num-batched-tokens 64" in caplog.text
    finally:
        engine.shutdown()
    given = make_engine(tiny_model("llama", seed=3), tokenizer, max_model_len=1024, max_num_batched_tokens=96)
    try:
        assert given.scheduler.max_batched_tokens == 96
    finally:
        given.shutdown()
