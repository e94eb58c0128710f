"""The vLLM engine behind the same API: position mapping always; the engine itself where vllm is installed."""

from __future__ import annotations

import httpx
import pytest

from patches.rope import PositionSpec
from server.engine.vllm import positions_for_vllm, vllm_available
from tests.conftest import openai_client, running_server

HEAD_DIM, BASE, TRAINED = 64, 100000.0, 8192
needs_vllm = pytest.mark.skipif(not vllm_available(), reason="vllm is not installed")


def test_scaled_types_map_to_vllm_rope_types_with_the_table_sized_to_the_served_length():
    overrides = positions_for_vllm(PositionSpec(type="ntk-mixed", factor=2, b=0.625), HEAD_DIM, BASE, TRAINED, 16384)
    assert overrides["max_position_embeddings"] == 16384  # vLLM sizes its cos/sin table by this
    assert overrides["rope_parameters"] == {"rope_type": "ntk", "factor": 2.0, "mixed_b": 0.625, "rope_theta": BASE}
    assert positions_for_vllm(PositionSpec(), HEAD_DIM, BASE, TRAINED, 8192) == {}
    dynamic = positions_for_vllm(PositionSpec(type="dynamic", factor=2), HEAD_DIM, BASE, TRAINED, 16384)
    assert dynamic["rope_parameters"]["rope_theta"] == pytest.approx(BASE * 3 ** (64 / 62))  # scale 2*16k/8k - 1 = 3
    for spec, says in ((PositionSpec(type="rerope"), "native"), (PositionSpec(type="ntk", factor=2, logn=True), "log-n")):
        with pytest.raises(ValueError, match=says):
            positions_for_vllm(spec, HEAD_DIM, BASE, TRAINED, 16384)


@pytest.fixture(scope="module")
def vllm_server(bundled_path):
    from server.engine.vllm import VllmConfig, VllmEngine
    from server.metrics import Metrics

    engine = VllmEngine(VllmConfig(model_path=str(bundled_path), model_name="smollm2-135m-instruct", dtype="float32",
                                   max_num_seqs=8, max_model_len=4096), metrics=Metrics("vllm-test"))
    with running_server(engine) as url:
        yield url


PROMPTS = ["The capital of France is", "Once upon a time, in a land far away,", "def fibonacci(n):", "1, 2, 3, 4,"]


@needs_vllm
def test_greedy_outputs_agree_with_the_native_engine(vllm_server, bundled_server):
    native, other = openai_client(bundled_server), openai_client(vllm_server)
    for prompt in PROMPTS:
        want = native.completions.create(model="smollm2-135m-instruct", prompt=prompt, max_tokens=24, temperature=0)
        got = other.completions.create(model="smollm2-135m-instruct", prompt=prompt, max_tokens=24, temperature=0)
        assert got.choices[0].text == want.choices[0].text, prompt
        assert got.usage.prompt_tokens == want.usage.prompt_tokens and got.usage.completion_tokens == 24
    chunks = list(other.chat.completions.create(model="smollm2-135m-instruct", temperature=0, max_tokens=12, stream=True,
                                                messages=[{"role": "user", "content": "What is the capital of France?"}]))
    assert "Paris" in "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


@needs_vllm
def test_what_only_the_native_engine_does_gets_a_400_naming_it(vllm_server):
    body = {"prompt": "Q:", "max_tokens": 4}
    for extra in ({"contexts": ["a"]}, {"constraint": {"choices": ["a", "b"]}}, {"position": {"type": "rope"}}):
        reply = httpx.post(f"{vllm_server}/v1/completions", json={**body, **extra})
        assert reply.status_code == 400 and "--engine native" in reply.json()["error"]["message"], extra
    assert httpx.get(f"{vllm_server}/v1/models").json()["data"][0]["engine"] == "vllm"
