"""One request's failure in a step fails that request alone; the engine goes on (tiny random-weight model).

Failures are injected where they happen in real life: in the batched forward
pass, in sampling (a parameter no check caught), in prefill, and a fatal
fault (out of memory) that must stop the engine and tell the server.
"""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest
import torch

from longserve.server.engine.base import GenerationRequest, SamplingParams
from tests.conftest import make_engine, running_engine, running_server, wait_until

PROMPTS = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16], [17, 18]]
MAX_TOKENS = 12


async def run_all(engine, requests: list[GenerationRequest]) -> list[tuple[list[int], str | None]]:
    """(tokens, error) per request, all submitted at once so that they share batches."""

    async def one(request):
        tokens, error = [], None
        async for delta in engine.generate(request):
            tokens += delta.token_ids
            error = error or delta.error
        return tokens, error

    return await asyncio.gather(*(one(r) for r in requests))


def greedy(request_id: str, prompt: list[int], **params) -> GenerationRequest:
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, **params)
    return GenerationRequest(request_id, [prompt], params)


@pytest.fixture()
def engine(tiny_llama, tokenizer):
    with running_engine(tiny_llama, tokenizer, max_num_seqs=4, max_model_len=128) as engine:
        yield engine


@pytest.fixture(scope="module")
def alone(tiny_llama, tokenizer):
    """Each prompt's greedy tokens, decoded alone in a fresh engine."""
    engine = make_engine(tiny_llama, tokenizer, max_num_seqs=4, max_model_len=128)
    try:
        return [asyncio.run(run_all(engine, [greedy(f"alone-{i}", p)]))[0][0] for i, p in enumerate(PROMPTS)]
    finally:
        engine.shutdown()


def test_a_failing_forward_pass_fails_only_its_request(engine, alone):
    real_run = engine.runner.run

    def run(decode, chunks):
        if any(seq.request_id == "bad" and len(seq.output_ids) >= 3 for seq in decode):
            raise ValueError("injected: this request's rows break the forward pass")
        return real_run(decode, chunks)

    engine.runner.run = run
    requests = [greedy(f"good-{i}", p) for i, p in enumerate(PROMPTS[:3])] + [greedy("bad", PROMPTS[3])]
    results = asyncio.run(run_all(engine, requests))
    for (tokens, error), expected in zip(results[:3], alone[:3]):
        assert error is None
        assert tokens == expected  # the same tokens as alone: the rerun did not disturb their cache rows
    bad_tokens, bad_error = results[3]
    assert "injected" in bad_error and len(bad_tokens) == 3
    assert engine.is_alive() and engine.scheduler.num_running == 0 and not engine.scheduler.waiting
    engine.runner.run = real_run
    assert asyncio.run(run_all(engine, [greedy("next", PROMPTS[3])]))[0] == (alone[3], None)


def test_a_failing_sampler_row_fails_only_its_request(engine, alone):
    bad = greedy("bad", PROMPTS[3])

    async def break_bad_request_while_it_decodes():
        tokens, error = [], None
        async for delta in engine.generate(bad):
            tokens += delta.token_ids
            error = error or delta.error
            if len(tokens) == 2:  # a logit_bias id past the vocabulary (the HTTP layer refuses it): only a bug sends it
                bad.params.logit_bias = {10**6: 1.0}
        return tokens, error

    async def both():
        good = run_all(engine, [greedy(f"good-{i}", p) for i, p in enumerate(PROMPTS[:3])])
        return await asyncio.gather(good, break_bad_request_while_it_decodes())

    good_results, (bad_tokens, bad_error) = asyncio.run(both())
    assert [tokens for tokens, _ in good_results] == alone[:3]  # sampled in the same batch as the bad row
    assert all(error is None for _, error in good_results)
    assert bad_error is not None and len(bad_tokens) >= 2
    assert engine.is_alive()
    assert asyncio.run(run_all(engine, [greedy("next", PROMPTS[0])]))[0] == (alone[0], None)


def test_a_failing_prefill_fails_only_its_request(engine, alone):
    real_run = engine.runner.run

    def run(decode, chunks):
        if any(chunk.seq.request_id == "bad" for chunk in chunks):
            raise IndexError("injected: this prompt breaks prefill")
        return real_run(decode, chunks)

    engine.runner.run = run
    requests = [greedy("bad", PROMPTS[0])] + [greedy(f"good-{i}", p) for i, p in enumerate(PROMPTS[1:], start=1)]
    results = asyncio.run(run_all(engine, requests))
    assert "injected" in results[0][1]
    assert [tokens for tokens, _ in results[1:]] == alone[1:]
    assert engine.is_alive() and engine.blocks.in_use == 0
    engine.runner.run = real_run


def test_out_of_memory_stops_the_engine_and_tells_the_server(engine):
    died = threading.Event()
    engine.on_dead = lambda reason: died.set()

    def run(decode, chunks):
        raise torch.OutOfMemoryError("injected: out of memory")

    engine.runner.run = run
    results = asyncio.run(run_all(engine, [greedy("a", PROMPTS[0]), greedy("b", PROMPTS[1])]))
    assert all(error and "out of memory" in error for _, error in results)
    assert died.wait(30)
    assert not engine.is_alive()


@pytest.mark.server
def test_health_reports_a_stalled_engine(tiny_llama, tokenizer):
    engine = make_engine(tiny_llama, tokenizer, max_num_seqs=2, max_model_len=128)
    release = threading.Event()
    real_run = engine.runner.run

    def stuck_run(decode, chunks):
        release.wait(30)  # a hung kernel, a deadlock: the step never finishes
        return real_run(decode, chunks)

    engine.runner.run = stuck_run
    with running_server(engine, health_stall_seconds=1.0) as url:
        assert httpx.get(f"{url}/health").status_code == 200
        worker = threading.Thread(target=httpx.post, args=(f"{url}/v1/completions",),
                                  kwargs={"json": {"prompt": "Hello", "max_tokens": 3}, "timeout": 60})
        worker.start()
        assert wait_until(lambda: httpx.get(f"{url}/health").status_code == 503, timeout=30)  # the stall passed 1 s
        answer = httpx.get(f"{url}/health").json()["error"]["message"]
        assert "--health-stall-seconds" in answer
        assert "longserve:engine_step_age_seconds" in httpx.get(f"{url}/metrics").text
        release.set()
        worker.join(30)
        assert wait_until(lambda: httpx.get(f"{url}/health").status_code == 200, timeout=120)
