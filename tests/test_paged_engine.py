"""The engine core on tiny models: token-budget steps, a small memory budget, the prefix cache."""

from __future__ import annotations

import asyncio
import os

import pytest

from longserve.patches.rope import PositionSpec
from longserve.server.engine.base import GenerationRequest, SamplingParams
from tests.conftest import make_engine, running_engine, tiny_model, wait_until
from tests.test_engine import hf_greedy


def words(tokenizer, count: int, salt: int) -> list[int]:
    """A prompt of exactly `count` tokens, different for each salt."""
    ids = tokenizer.encode(" ".join(f"w{salt}x{i}" for i in range(count)))
    return ids[:count]


def record_steps(engine) -> list[dict]:
    """Wrap the runner: one record per forward pass (tokens, and the chunks that ended a prompt)."""
    steps, real_run = [], engine.runner.run

    def run(decode, chunks):
        steps.append({"tokens": len(decode) + sum(c.end - c.start for c in chunks),
                      "ended": [c.seq.request_id for c in chunks if c.ends_prompt]})
        return real_run(decode, chunks)

    engine.runner.run = run
    return steps


async def generate(engine, request_id: str, ids: list[int], max_tokens: int, logprobs: int | None = None,
                   prompt_logprobs: int | None = None, position=None):
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=logprobs,
                            prompt_logprobs=prompt_logprobs)
    tokens, records, prompt_records, cached = [], [], [], 0
    async for delta in engine.generate(GenerationRequest(request_id, [ids], params, position=position)):
        assert delta.error is None, delta.error
        tokens += delta.token_ids
        records += delta.logprobs or []
        prompt_records += delta.prompt_logprobs or []
        cached = max(cached, delta.cached_tokens)
    return {"tokens": tokens, "logprobs": [r.logprob for r in records], "prompt": [r.logprob for r in prompt_records],
            "cached": cached}


def one(engine, *args, **kwargs):
    return asyncio.run(generate(engine, *args, **kwargs))


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", seed=11, max_position_embeddings=2048)


def test_short_prompts_start_before_a_long_prefill_ends_and_no_step_exceeds_the_budget(model, tokenizer):
    engine = make_engine(model, tokenizer, max_num_seqs=12, max_model_len=2048, prefill_chunk=64, max_num_batched_tokens=128)
    try:
        steps = record_steps(engine)
        long = words(tokenizer, 900, salt=0)
        shorts = [words(tokenizer, 12 + i, salt=i + 1) for i in range(8)]

        async def together():
            jobs = [generate(engine, "long", long, 4)] + [generate(engine, f"short-{i}", ids, 6) for i, ids in enumerate(shorts)]
            return await asyncio.gather(*jobs)

        results = asyncio.run(together())
        assert max(step["tokens"] for step in steps) <= 128
        ended_at = {rid: index for index, step in enumerate(steps) for rid in step["ended"]}
        assert all(ended_at[f"short-{i}"] < ended_at["long"] for i in range(8)), ended_at
        assert sum(1 for step in steps if len(step["ended"]) > 1) >= 1  # several prompts in one forward pass
        expected = [hf_greedy(model, ids, n, eos=False) for ids, n in [(long, 4)] + [(ids, 6) for ids in shorts]]
        assert [r["tokens"] for r in results] == expected
    finally:
        engine.shutdown()


def rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


def test_a_burst_four_times_the_pool_completes_by_waiting_and_preemption(model, tokenizer):
    # 2 layers x 2 KV heads x 16 dims x 2 planes x 4 bytes = 512 bytes a token: 1 MiB holds 2048 tokens
    # (no room kept for ReRoPE's third plane: --no-request-rerope)
    pool_gib = 2**20 / 2**30
    prompts = [words(tokenizer, 300, salt=20 + i) for i in range(8)]  # 8 x (300 + 724) tokens = 4x the pool
    roomy = make_engine(model, tokenizer, max_num_seqs=8, max_model_len=2048)
    try:
        reference = [one(roomy, f"r{i}", ids, 724)["tokens"] for i, ids in enumerate(prompts[:2])]
    finally:
        roomy.shutdown()
    tight = make_engine(model, tokenizer, max_num_seqs=8, max_model_len=2048, kv_cache_memory=pool_gib, request_rerope=False)
    try:
        assert tight.pool.num_tokens == 2048
        before = rss_bytes()

        async def burst():
            return await asyncio.gather(*(generate(tight, f"b{i}", ids, 724) for i, ids in enumerate(prompts)))

        results = asyncio.run(burst())
        assert tight.scheduler.num_preempted > 0
        assert [r["tokens"] for r in results[:2]] == reference  # greedy: preemption and recompute change nothing
        assert all(len(r["tokens"]) == 724 for r in results)
        margin = 64 * 2**20  # Python objects, logits of a step, allocator slack
        assert rss_bytes() - before < tight.pool.bytes_allocated() + margin
        assert wait_until(lambda: tight.blocks.in_use == 0)
    finally:
        tight.shutdown()


@pytest.fixture(scope="module")
def cached_engine(model, tokenizer):
    with running_engine(model, tokenizer, max_num_seqs=4, max_model_len=2048) as engine:
        yield engine


@pytest.fixture(scope="module")
def uncached_engine(model, tokenizer):
    with running_engine(model, tokenizer, max_num_seqs=4, max_model_len=2048, enable_prefix_caching=False) as engine:
        yield engine


def test_a_cached_run_gives_the_same_tokens_and_logprobs_as_an_uncached_one(cached_engine, uncached_engine, tokenizer):
    document = words(tokenizer, 400, salt=40)
    cold = one(uncached_engine, "cold", document + words(tokenizer, 10, salt=41), 12, logprobs=1)
    one(cached_engine, "warm-up", document + words(tokenizer, 10, salt=42), 4)
    warm = one(cached_engine, "warm", document + words(tokenizer, 10, salt=41), 12, logprobs=1)
    assert cold["cached"] == 0 and warm["cached"] == 400 // 16 * 16
    assert warm["tokens"] == cold["tokens"]
    assert warm["logprobs"] == pytest.approx(cold["logprobs"], abs=1e-4)
    # Scoring the prompt needs every position computed: such a request reads no cached blocks, and its scores
    # equal the uncached engine's.
    scored = one(cached_engine, "scored", document + words(tokenizer, 10, salt=41), 2, prompt_logprobs=1)
    reference = one(uncached_engine, "scored", document + words(tokenizer, 10, salt=41), 2, prompt_logprobs=1)
    assert scored["cached"] == 0 and scored["prompt"] == pytest.approx(reference["prompt"], abs=1e-4)


def test_a_different_position_method_misses_the_cache(cached_engine, uncached_engine, tokenizer):
    document = words(tokenizer, 300, salt=50)
    one(cached_engine, "plain", document, 2)
    ntk = PositionSpec(type="ntk", factor=4.0)
    scaled = one(cached_engine, "ntk", document, 8, position=ntk)
    assert scaled["cached"] == 0
    assert scaled["tokens"] == one(uncached_engine, "ntk", document, 8, position=ntk)["tokens"]
    again = one(cached_engine, "ntk-again", document, 8, position=ntk)
    assert again["cached"] > 0 and again["tokens"] == scaled["tokens"]
    rerope = PositionSpec(type="rerope", window=64)
    clipped = one(cached_engine, "rerope", document, 8, position=rerope)
    assert clipped["cached"] == 0
    assert clipped["tokens"] == one(uncached_engine, "rerope", document, 8, position=rerope)["tokens"]


def test_eviction_under_pressure_loses_no_correctness(model, tokenizer):
    engine = make_engine(model, tokenizer, max_num_seqs=2, max_model_len=1024, kv_cache_memory=2**20 / 2**30)
    try:
        first = words(tokenizer, 600, salt=60)
        cold = one(engine, "first", first, 8)
        for i in range(3):  # other documents push the first one's blocks out
            one(engine, f"other-{i}", words(tokenizer, 600, salt=61 + i), 8)
        again = one(engine, "again", first, 8)
        assert again["cached"] < 600 // 16 * 16  # some of its blocks were evicted
        assert again["tokens"] == cold["tokens"] == hf_greedy(model, first, 8, eos=False)
    finally:
        engine.shutdown()


def test_cache_figures_reach_metrics(cached_engine, tokenizer):
    document = words(tokenizer, 200, salt=70)
    one(cached_engine, "m1", document, 2)
    one(cached_engine, "m2", document, 2)
    blocks = cached_engine.blocks
    assert blocks.hits >= 192 and blocks.queries > blocks.hits
    text = cached_engine.metrics.render().decode()
    assert "vllm:prefix_cache_hits_total" in text and "vllm:kv_cache_usage_perc" in text


@pytest.mark.server
def test_the_sdk_sees_cached_tokens_in_usage_and_metrics_count_hits(model, tokenizer):
    from tests.conftest import metric_value, openai_client, running_server

    engine = make_engine(model, tokenizer, name="tiny", max_num_seqs=2, max_model_len=1024)
    with running_server(engine) as url:
        client = openai_client(url)
        document = tokenizer.decode(words(tokenizer, 300, salt=80))
        first = client.completions.create(model="tiny", prompt=document + " first", max_tokens=2)
        second = client.completions.create(model="tiny", prompt=document + " second", max_tokens=2)
        assert first.usage.prompt_tokens_details.cached_tokens == 0
        assert second.usage.prompt_tokens_details.cached_tokens >= 256
        streamed = client.completions.create(model="tiny", prompt=document + " third", max_tokens=2, stream=True,
                                             stream_options={"include_usage": True})
        usage = [chunk.usage for chunk in streamed if chunk.usage is not None][-1]
        assert usage.prompt_tokens_details.cached_tokens >= 256
        assert wait_until(lambda: metric_value(url, "vllm:prefix_cache_hits_total", model_name="tiny") >= 512)


async def nbce_answer(engine, request_id: str, documents: list[list[int]], question: list[int], max_tokens: int = 6):
    """One NBCE answer over the documents, each followed by the question: (its tokens, the most cached tokens)."""
    from longserve.patches.nbce import NbceParams

    rows = [question] + [document + question for document in documents]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    tokens, cached = [], 0
    async for delta in engine.generate(GenerationRequest(request_id, rows, params, nbce=NbceParams())):
        assert delta.error is None, delta.error
        tokens += delta.token_ids
        cached = max(cached, delta.cached_tokens)
    return tokens, cached


def test_nbce_rows_reuse_their_documents_for_a_new_question(cached_engine, uncached_engine, tokenizer):
    documents = [words(tokenizer, 200, salt=90 + k) for k in range(3)]
    asyncio.run(nbce_answer(cached_engine, "nbce-1", documents, words(tokenizer, 8, salt=95)))
    warm_tokens, warm_cached = asyncio.run(nbce_answer(cached_engine, "nbce-2", documents, words(tokenizer, 8, salt=96)))
    cold_tokens, cold_cached = asyncio.run(nbce_answer(uncached_engine, "nbce-2", documents, words(tokenizer, 8, salt=96)))
    assert cold_cached == 0 and warm_cached == 3 * (200 // 16 * 16)  # every document's full blocks
    assert warm_tokens == cold_tokens
