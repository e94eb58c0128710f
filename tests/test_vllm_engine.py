"""The vLLM engine behind the same API: position mapping always; the engine itself where vllm is installed.

The server tests of test_server.py run against both engines; these are the
checks that only make sense for vLLM: agreement with the native engine,
tries through the logits processor, and the 400 for what only the native
engine does. Positions past the trained length and log-n through the plugin
are checked on vLLM's workers in test_vllm_distributed.py.
"""

from __future__ import annotations

import os

import httpx
import pytest

from longserve.patches.rope import PositionSpec
from longserve.server.engine.vllm import positions_for_vllm, vllm_available
from tests.conftest import openai_client

HEAD_DIM, BASE, TRAINED = 64, 100000.0, 8192
MODEL = "smollm2-135m-instruct"


def test_scaled_types_map_to_vllm_rope_types_with_the_table_sized_to_the_served_length():
    overrides = positions_for_vllm(PositionSpec(type="ntk-mixed", factor=2, b=0.625), HEAD_DIM, BASE, TRAINED, 16384)
    assert overrides["max_position_embeddings"] == 16384  # vLLM sizes its cos/sin table by this
    assert overrides["rope_parameters"] == {"rope_type": "ntk", "factor": 2.0, "mixed_b": 0.625, "rope_theta": BASE}
    assert positions_for_vllm(PositionSpec(), HEAD_DIM, BASE, TRAINED, 8192) == {}
    dynamic = positions_for_vllm(PositionSpec(type="dynamic", factor=2), HEAD_DIM, BASE, TRAINED, 16384)
    assert dynamic["rope_parameters"]["rope_theta"] == pytest.approx(BASE * 3 ** (64 / 62))  # scale 2*16k/8k - 1 = 3
    with_logn = positions_for_vllm(PositionSpec(type="ntk", factor=2, logn=True), HEAD_DIM, BASE, TRAINED, 16384)
    assert with_logn == positions_for_vllm(PositionSpec(type="ntk", factor=2), HEAD_DIM, BASE, TRAINED, 16384)  # log-n: the plugin
    with pytest.raises(ValueError, match="native"):
        positions_for_vllm(PositionSpec(type="rerope"), HEAD_DIM, BASE, TRAINED, 16384)


def test_the_plugin_scales_each_query_by_its_logn_factor_and_leaves_nothing_else():
    import torch

    from longserve.patches.rope import logn_factors
    from longserve.patches.vllm_plugin import scale_queries

    positions = torch.tensor([0, 255, 256, 700])
    query = torch.randn(4, 3 * 8)
    scaled = scale_queries(positions, query, 256)
    assert torch.equal(scaled[:2], query[:2])  # within the trained length: untouched
    want = query * logn_factors(positions, 256)[:, None]
    assert torch.allclose(scaled, want) and scaled[3, 0] / query[3, 0] == pytest.approx(torch.log(torch.tensor(701.0)) / torch.log(torch.tensor(256.0)))
    assert torch.allclose(scale_queries(positions, query.view(4, 3, 8), 256), want.view(4, 3, 8))


@pytest.mark.vllm
@pytest.mark.skipif(not vllm_available(), reason="vllm is not installed")
def test_the_plugin_installs_once_however_often_vllm_loads_it():
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbeddingBase

    from longserve.patches.vllm_plugin import register

    register()
    installed = RotaryEmbeddingBase.forward
    register()
    assert RotaryEmbeddingBase.forward is installed


PROMPTS = ["The capital of France is", "Once upon a time, in a land far away,", "def fibonacci(n):", "1, 2, 3, 4,"]


@pytest.mark.vllm
@pytest.mark.skipif(not vllm_available(), reason="vllm is not installed")
def test_greedy_outputs_agree_with_the_native_engine(vllm_server, bundled_server):
    native, other = openai_client(bundled_server), openai_client(vllm_server)
    want = native.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    got = other.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    in_order = lambda reply: [choice.text for choice in sorted(reply.choices, key=lambda c: c.index)]  # noqa: E731
    assert in_order(got) == in_order(want)  # the prompts in one batch on each engine
    assert got.usage.prompt_tokens == want.usage.prompt_tokens and got.usage.completion_tokens == 24 * len(PROMPTS)
    chunks = list(other.chat.completions.create(model=MODEL, temperature=0, max_tokens=12, stream=True,
                                                messages=[{"role": "user", "content": "What is the capital of France?"}]))
    assert "Paris" in "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


@pytest.mark.vllm
@pytest.mark.skipif(not vllm_available(), reason="vllm is not installed")
def test_what_only_the_native_engine_does_gets_a_400_naming_it(vllm_server):
    body = {"prompt": "Q:", "max_tokens": 4}
    for extra in ({"contexts": ["a"]}, {"position": {"type": "rope"}},
                  {"constraint": {"choices": ["a", "b"]}, "use_beam_search": True, "n": 2}):
        reply = httpx.post(f"{vllm_server}/v1/completions", json={**body, **extra})
        assert reply.status_code == 400 and "--engine native" in reply.json()["error"]["message"], extra
    assert httpx.get(f"{vllm_server}/v1/models").json()["data"][0]["engine"] == "vllm"


ENTRIES = [
    {"key": "Paris ||| capital of", "value": "France"},
    {"key": "Paris ||| population", "value": 2102650},
    {"key": "Paris", "value": "a key that is a prefix of others"},
    {"key": "London ||| capital of", "value": "United Kingdom"},
    {"key": "夜曲（歌曲） ||| 演唱", "value": "周杰伦"},
]
QUESTIONS = ["Q: What is France's capital?\nA:", "Q: Who sang 夜曲?\nA:", "Q: How many people live in Paris?\nA:"]


@pytest.mark.vllm
@pytest.mark.skipif(not vllm_available(), reason="vllm is not installed")
def test_trie_constrained_answers_are_keys_and_equal_the_native_engine(vllm_server, bundled_server):
    for url in (vllm_server, bundled_server):
        assert httpx.post(f"{url}/v1/tries", json={"name": "kb", "entries": ENTRIES, "lead": " "}).status_code == 200
    native, other = openai_client(bundled_server), openai_client(vllm_server)
    keys = {e["key"]: e["value"] for e in ENTRIES}
    for question in QUESTIONS:
        kwargs = dict(model=MODEL, prompt=question, max_tokens=32, temperature=0, extra_body={"constraint": {"trie": "kb"}})
        want, got = native.completions.create(**kwargs).choices[0], other.completions.create(**kwargs).choices[0]
        assert got.text.strip() in keys and got.model_extra["key"] == got.text.strip()
        assert got.model_extra["value"] == keys[got.text.strip()]
        assert (got.text, got.model_extra["key"], got.finish_reason) == (want.text, want.model_extra["key"], want.finish_reason)
    choices = ["red", "green", "blue", "dark red"]
    sampled = other.completions.create(model=MODEL, prompt="My favourite colour is", max_tokens=8, temperature=1.5, n=6,
                                       seed=7, extra_body={"constraint": {"choices": choices, "lead": " "}})
    assert all(c.text.strip() in choices and c.model_extra["key"] == c.text.strip() for c in sampled.choices)


def test_a_trie_travels_inline_or_as_a_file_with_the_same_answers(vllm_server, monkeypatch):
    """Small tries ride inside the request (to workers on any node); a large one is a file on the shared
    --data-dir. The large case is forced by lowering the inline limit: the server runs in this process."""
    import longserve.patches.vllm_trie

    client = openai_client(vllm_server)
    choices = ["red", "green", "blue", "dark red"]
    answers, sent, make_args = [], [], longserve.patches.vllm_trie.trie_args

    def recorded(trie, end_token, inline, path):  # what each vLLM request carries: bytes, or a file there now
        sent.append(("inline" if inline is not None else "file", inline is None and os.path.isfile(path)))
        return make_args(trie, end_token, inline, path)

    monkeypatch.setattr(longserve.patches.vllm_trie, "trie_args", recorded)
    for inline_limit in (1 << 20, 0):
        monkeypatch.setattr(longserve.patches.vllm_trie, "INLINE_TRIE_BYTES", inline_limit)
        reply = client.completions.create(model=MODEL, prompt="My favourite colour is", max_tokens=8, temperature=0, n=2,
                                          extra_body={"constraint": {"choices": choices, "lead": " "}})
        answers.append([(c.text, c.model_extra["key"]) for c in reply.choices])
    assert answers[0] == answers[1] and all(key in choices for _, key in answers[0])
    assert sent == [("inline", False)] * 2 + [("file", True)] * 2  # n = 2: two vLLM requests each time


@pytest.mark.vllm
@pytest.mark.skipif(not vllm_available(), reason="vllm is not installed")
def test_the_loss_evaluation_scores_alike_through_either_engine(vllm_server, bundled_server, tmp_path):
    """`longserve eval loss` needs prompt log-probs: the vLLM engine gives them through vLLM's prompt_logprobs."""
    from longserve.clients.longeval import run_loss
    from longserve.clients.server_client import Server

    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"Line {i}: the quick brown fox jumps over the lazy dog." for i in range(80)))
    losses = [[r["loss"] for r in run_loss(Server.connect(f"{url}/v1", None, None), text, [256, 512], 64, [None])["records"]]
              for url in (bundled_server, vllm_server)]
    assert None not in losses[0] + losses[1]
    assert losses[1] == pytest.approx(losses[0], abs=2e-3)


@pytest.mark.vllm
@pytest.mark.skipif(not vllm_available(), reason="vllm is not installed")
def test_vllm_stores_fp8_where_its_cpu_backend_can_and_refuses_int8_at_start_up(bundled_path):
    """--kv-cache-dtype reaches vLLM's own cache config (on a CPU with AVX-512 or AMX, as vLLM's CPU backend needs for
    fp8), and a dtype vLLM cannot store here stops the engine before it starts, naming what to do instead."""
    import asyncio

    import torch

    from longserve.server.engine.base import GenerationRequest, SamplingParams
    from longserve.server.engine.config import EngineConfig
    from longserve.server.engine.metrics import Metrics
    from longserve.server.engine.vllm import VllmEngine, torch_has_cuda

    def config(cache_dtype: str) -> EngineConfig:
        return EngineConfig(model_path=str(bundled_path), model_name=MODEL, dtype="float32", max_num_seqs=2,
                            enforce_eager=True, kv_cache_memory=1, kv_cache_dtype=cache_dtype)

    if not torch_has_cuda():
        with pytest.raises(ValueError, match="int8: vLLM's CPU backend stores fp8 only"):
            VllmEngine(config("int8"))
        if not (torch.cpu._is_avx512_supported() or torch.cpu._is_amx_tile_supported()):
            with pytest.raises(ValueError, match="AVX-512 or AMX"):
                VllmEngine(config("fp8"))
            return
    engine = VllmEngine(config("fp8"), metrics=Metrics(MODEL))
    try:
        assert engine.engine.vllm_config.cache_config.cache_dtype == "fp8"
        assert engine.describe()["kv_cache_dtype"] == "fp8"

        async def answer():
            tokens = []
            params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
            async for delta in engine.generate(GenerationRequest("fp8", [engine.tokenizer.encode("Hello")], params)):
                assert delta.error is None, delta.error
                tokens += delta.token_ids
            return tokens

        assert len(asyncio.run(answer())) == 8
    finally:
        engine.shutdown()
