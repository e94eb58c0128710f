"""Every error code, auth, limits and disconnects, on a tiny random-weight model (fast)."""

from __future__ import annotations

import threading

import httpx
import openai
import pytest

from tests.conftest import make_engine, openai_client, running_server


def assert_openai_error(response: httpx.Response, status: int, *words: str, param: str | None = None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    for word in words:
        assert word in error["message"], error["message"]
    if param is not None:
        assert error["param"] == param


def post(url: str, path: str, body, timeout: float = 60, **kwargs) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=timeout, **kwargs)


def test_prompt_plus_max_tokens_over_limit_names_both_numbers(tiny_server):
    response = post(tiny_server, "/v1/completions", {"prompt": "hello there", "max_tokens": 300})
    assert_openai_error(response, 400, "300", "256", param="max_tokens")
    n_prompt = len(httpx.post(f"{tiny_server}/tokenize", json={"prompt": "hello there"}).json()["tokens"])
    assert f"{n_prompt} tokens" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    "body, words, param",
    [
        ({"prompt": "x", "temperature": 5}, ["temperature"], "temperature"),
        ({"prompt": "x", "max_tokens": 0}, ["max_tokens"], "max_tokens"),
        ({"prompt": "x", "n": 0}, ["n"], "n"),
        ({"prompt": "x", "maxtokens": 3}, ["unknown field", "maxtokens"], "maxtokens"),
        ({"max_tokens": 3}, ["prompt"], "prompt"),
        ({"prompt": ""}, ["empty"], "prompt"),
        ({"prompt": []}, ["empty"], "prompt"),
        ({"prompt": [10, -1]}, ["-1"], "prompt"),
        ({"prompt": "x", "stop": [""]}, ["stop"], "stop"),
        ({"prompt": "x", "logprobs": 50}, ["logprobs"], "logprobs"),
        ({"prompt": "x", "logit_bias": {"abc": 1}}, ["token id"], "logit_bias"),
        ({"prompt": "x", "stream_options": {"include_usage": True}}, ["stream"], None),
        ({"prompt": "x", "stop_token_ids": [10**9]}, ["vocabulary"], "stop_token_ids"),
    ],
)
def test_invalid_completion_fields_get_400(tiny_server, body, words, param):
    assert_openai_error(post(tiny_server, "/v1/completions", body), 400, *words, param=param)


@pytest.mark.parametrize(
    "body, words",
    [
        ({"messages": []}, ["messages"]),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, ["role"]),
        ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, ["logprobs"]),
        ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, ["tools"]),
        # a malformed tool history reached the chat template and came back as a 500 (KeyError)
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function"}]},
                       {"role": "tool", "tool_call_id": "c1", "content": "{}"}]}, ["tool_calls[0] needs a function with a name"]),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "{}"}]}, ["tool message needs tool_call_id"]),
    ],
)
def test_invalid_chat_fields_get_400(tiny_server, body, words):
    assert_openai_error(post(tiny_server, "/v1/chat/completions", body), 400, *words)
    assert httpx.get(f"{tiny_server}/health").status_code == 200
    assert post(tiny_server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).status_code == 200


def test_malformed_json_gets_400_not_500(tiny_server):
    response = httpx.post(f"{tiny_server}/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert_openai_error(response, 400, "JSON")


def test_unknown_model_gets_404(tiny_server):
    client = openai_client(tiny_server)
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    assert "gpt-4" in caught.value.body["message"]


def test_body_over_limit_gets_413_with_and_without_content_length(tiny_server):
    big = {"prompt": "x" * 5000}
    assert_openai_error(post(tiny_server, "/v1/completions", big), 413, "--max-body-bytes")

    def chunks():
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}'

    response = httpx.post(f"{tiny_server}/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert_openai_error(response, 413, "--max-body-bytes")


def test_full_queue_gets_429_with_retry_after(tiny_server):
    """max_num_seqs=2 and max_waiting=1: a request for 3 choices fills the server."""
    client = openai_client(tiny_server)
    started = threading.Event()

    def fill():
        stream = client.completions.create(model="tiny", prompt="a", max_tokens=200, n=3, stream=True, extra_body={"ignore_eos": True})
        for _ in stream:
            started.set()

    worker = threading.Thread(target=fill)
    worker.start()
    assert started.wait(30)
    response = post(tiny_server, "/v1/completions", {"prompt": "b", "max_tokens": 2})
    assert_openai_error(response, 429, "retry later")
    assert response.headers["retry-after"] == "1"
    worker.join(timeout=60)
    assert post(tiny_server, "/v1/completions", {"prompt": "b", "max_tokens": 2}).status_code == 200


@pytest.mark.server
def test_api_key_protects_v1_only(tiny_llama, tokenizer):
    engine = make_engine(tiny_llama, tokenizer)
    with running_server(engine, api_key="sekret") as url:
        with pytest.raises(openai.AuthenticationError):
            openai_client(url, api_key="wrong").models.list()
        assert_openai_error(httpx.get(f"{url}/v1/models"), 401, "API key")
        assert openai_client(url, api_key="sekret").models.list().data[0].id == "tiny"
        assert httpx.get(f"{url}/health").status_code == 200
        assert httpx.get(f"{url}/metrics").status_code == 200


@pytest.mark.server
def test_health_is_503_when_the_engine_is_dead(tiny_llama, tokenizer):
    engine = make_engine(tiny_llama, tokenizer)
    with running_server(engine) as url:
        engine.shutdown()
        response = httpx.get(f"{url}/health")
        assert_openai_error(response, 503, "engine")
        assert_openai_error(post(url, "/v1/completions", {"prompt": "hi", "max_tokens": 2}), 503, "engine")


def test_unknown_route_gets_404_in_openai_shape(tiny_server):
    assert_openai_error(httpx.get(f"{tiny_server}/v1/nope"), 404, "/v1/nope")
