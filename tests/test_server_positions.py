"""Position settings and prompt scoring over HTTP, on tiny random-weight models."""

from __future__ import annotations

import httpx
import pytest
import torch

from longserve.patches.rope import PositionSpec
from tests.conftest import make_engine, openai_client, running_server, tiny_model


@pytest.fixture(scope="module")
def scaled_server(tokenizer):
    model = tiny_model("llama", seed=7, max_position_embeddings=128)
    engine = make_engine(model, tokenizer, position=PositionSpec(type="ntk-mixed", factor=2, logn=True))
    with running_server(engine) as url:
        yield url, model


def test_models_report_the_method_and_the_scaled_length(scaled_server):
    url, _ = scaled_server
    entry = httpx.get(f"{url}/v1/models").json()["data"][0]
    assert entry["max_model_len"] == 256 and entry["trained_len"] == 128
    assert entry["position"] == {"type": "ntk-mixed", "factor": 2.0, "b": 0.625, "logn": True}


def test_request_position_overrides_the_server_and_bad_ones_get_400(scaled_server, tokenizer):
    url, _ = scaled_server
    prompt = tokenizer.decode(tokenizer.encode("Numbers: 1 2 3 4 5 6 7 8 9 10 " * 12)[:200])
    body = {"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 0}

    def scores(extra: dict) -> list:
        reply = httpx.post(f"{url}/v1/completions", json={**body, **extra}).json()
        return reply["choices"][0]["logprobs"]["token_logprobs"]

    server_default = scores({})
    assert scores({"position": {"type": "ntk-mixed", "factor": 2, "logn": True}}) == server_default
    plain = scores({"position": {"type": "rope"}})
    assert plain != server_default
    bad = httpx.post(f"{url}/v1/completions", json={**body, "position": {"type": "ntk-magic"}})
    assert bad.status_code == 400 and "ntk-mixed" in bad.json()["error"]["message"]
    assert bad.json()["error"]["param"] == "position.type"


@pytest.mark.server
def test_echo_logprobs_score_the_prompt_like_a_direct_forward(tokenizer):
    model = tiny_model("llama", seed=8)
    engine = make_engine(model, tokenizer, prefill_chunk=16)  # several chunks: scores cross chunk borders
    ids = tokenizer.encode("The sun is yellow. The sky is blue. The grass is green. Here we go." * 2)
    with torch.no_grad():
        reference = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    expected = [float(reference[i, ids[i + 1]]) for i in range(len(ids) - 1)]
    with running_server(engine) as url:
        client = openai_client(url)
        for stream in (False, True):
            reply = client.completions.create(model="tiny", prompt=ids, max_tokens=0 if not stream else 1, echo=True, logprobs=2, stream=stream)
            if stream:
                chunks = list(reply)
                tokens = [t for c in chunks for t in c.choices[0].logprobs.tokens]
                scores = [s for c in chunks for s in c.choices[0].logprobs.token_logprobs][: len(ids)]
                assert "".join(c.choices[0].text for c in chunks).startswith(tokenizer.decode(ids))
            else:
                choice = reply.choices[0]
                tokens, scores = choice.logprobs.tokens, choice.logprobs.token_logprobs
                assert choice.text == tokenizer.decode(ids) and len(tokens) == len(ids)
                assert reply.usage.completion_tokens == 0 and choice.finish_reason == "length"
            assert scores[0] is None
            assert scores[1:] == pytest.approx(expected, abs=1e-4)
        no_echo = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 0})
        assert no_echo.status_code == 400 and "echo" in no_echo.json()["error"]["message"]


@pytest.mark.server
def test_a_rerope_server_reports_its_window_and_takes_clipped_settings_per_request(tokenizer):
    model = tiny_model("llama", seed=9, max_position_embeddings=128)
    engine = make_engine(model, tokenizer, max_model_len=512, position=PositionSpec(type="rerope", logn=True))
    prompt = tokenizer.decode(tokenizer.encode("Numbers: 1 2 3 4 5 6 7 8 9 10 " * 20)[:300])
    body = {"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 0}
    with running_server(engine) as url:
        entry = httpx.get(f"{url}/v1/models").json()["data"][0]
        assert entry["position"] == {"type": "rerope", "window": 64, "logn": True}  # default window L/2
        assert entry["max_model_len"] == 512

        def scores(extra: dict) -> list:
            reply = httpx.post(f"{url}/v1/completions", json={**body, **extra})
            assert reply.status_code == 200, reply.text
            return reply.json()["choices"][0]["logprobs"]["token_logprobs"]

        server_default = scores({})
        assert scores({"position": {"type": "rerope", "window": 64, "logn": True}}) == server_default
        assert scores({"position": {"type": "leaky-rerope", "window": 64, "k": 8}}) != server_default
        assert scores({"position": {"type": "rope"}}) != server_default
        for bad, param in (({"type": "rerope", "window": 0}, "position.window"),
                           ({"type": "leaky-rerope", "k": 0.5}, "position.k"),
                           ({"type": "rerope", "factor": 2}, "position")):
            reply = httpx.post(f"{url}/v1/completions", json={**body, "position": bad})
            assert reply.status_code == 400, bad
            assert reply.json()["error"]["param"] == param
        message = httpx.post(f"{url}/v1/completions", json={**body, "position": {"type": "ntk", "window": 8}}).json()["error"]["message"]
        assert "window" in message and "rerope" in message
