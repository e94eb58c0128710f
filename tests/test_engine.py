"""The native engine against transformers' own generate, token for token (float32 greedy)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from longserve.server.engine.base import EngineOverloaded, GenerationRequest, SamplingParams
from tests.conftest import make_engine, tiny_model, wait_until

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a land far away,",
    "def fibonacci(n):",
    "1, 2, 3, 4,",
    "The following is a list of the largest cities in the world by population. First, Tokyo.",
]


def hf_greedy(model, ids: list[int], max_new_tokens: int, eos: bool = True) -> list[int]:
    kwargs = {} if eos else {"eos_token_id": None}
    out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0, **kwargs)
    return out[0, len(ids) :].tolist()


async def engine_greedy(engine, prompts_ids: list[list[int]], max_tokens: int, ignore_eos: bool = False, stagger: float = 0.0):
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=ignore_eos)

    async def one(i, ids):
        await asyncio.sleep(stagger * i)  # later requests join a batch already decoding
        tokens = []
        async for delta in engine.generate(GenerationRequest(f"req-{i}", [ids], params)):
            tokens += delta.token_ids
        return tokens

    return await asyncio.gather(*(one(i, ids) for i, ids in enumerate(prompts_ids)))


@pytest.fixture(scope="module")
def bundled_engine(bundled_model, tokenizer):
    engine = make_engine(bundled_model, tokenizer, name="bundled", max_num_seqs=8)
    yield engine
    engine.shutdown()


def test_bundled_greedy_matches_generate_alone_and_batched(bundled_engine, bundled_model, tokenizer):
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    expected = [hf_greedy(bundled_model, ids, 24) for ids in prompts]
    alone = [asyncio.run(engine_greedy(bundled_engine, [ids], 24))[0] for ids in prompts[:2]]
    assert alone == expected[:2]
    batched = asyncio.run(engine_greedy(bundled_engine, prompts, 24, stagger=0.3))
    assert batched == expected


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_tiny_families_match_generate_with_chunked_prefill(family, tokenizer):
    model = tiny_model(family, seed=1)
    engine = make_engine(model, tokenizer, max_num_seqs=4, prefill_chunk=16)
    try:
        prompts = [tokenizer.encode(p) * k for p, k in zip(PROMPTS, (1, 3, 6, 2, 4))]  # up to ~100 tokens
        expected = [hf_greedy(model, ids, 20, eos=False) for ids in prompts]
        got = asyncio.run(engine_greedy(engine, prompts, 20, ignore_eos=True, stagger=0.02))
        assert got == expected
    finally:
        engine.shutdown()


def test_batch_outgrowing_cache_capacity_stays_exact(tokenizer):
    """Sequences crossing the 256-token capacity block grow the cache mid-batch."""
    model = tiny_model("llama", seed=2)
    engine = make_engine(model, tokenizer, max_num_seqs=3, prefill_chunk=64)
    try:
        prompts = [tokenizer.encode(PROMPTS[1]) * 20, tokenizer.encode(PROMPTS[0]), tokenizer.encode(PROMPTS[3]) * 5]
        assert len(prompts[0]) > 200
        expected = [hf_greedy(model, ids, 60, eos=False) for ids in prompts]
        assert asyncio.run(engine_greedy(engine, prompts, 60, ignore_eos=True)) == expected
        assert engine.blocks.in_use == 0
    finally:
        engine.shutdown()


def test_waiting_queue_limit_raises_overloaded(tiny_llama, tokenizer):
    engine = make_engine(tiny_llama, tokenizer, max_num_seqs=1, max_waiting=1)
    try:
        async def scenario():
            params = SamplingParams(max_tokens=10_000 // 100, temperature=0.0, ignore_eos=True)
            ids = tokenizer.encode("hello")
            first = engine.generate(GenerationRequest("a", [ids], params, n=2))  # 2 sequences: 1 runs, 1 waits
            with pytest.raises(EngineOverloaded):
                engine.generate(GenerationRequest("b", [ids], params))
            tokens = 0
            async for delta in first:
                tokens += len(delta.token_ids)
            return tokens

        assert asyncio.run(scenario()) == 200
    finally:
        engine.shutdown()


def test_abort_frees_slots(tiny_llama, tokenizer):
    engine = make_engine(tiny_llama, tokenizer, max_num_seqs=4)
    try:
        async def scenario():
            params = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
            stream = engine.generate(GenerationRequest("a", [tokenizer.encode("hello")], params, n=3))
            seen = 0
            async for delta in stream:
                seen += 1
                if seen == 10:
                    break
            await stream.aclose()

        asyncio.run(scenario())
        assert wait_until(lambda: engine.blocks.in_use == 0, timeout=30)
        assert not engine.scheduler.has_work()
    finally:
        engine.shutdown()
