"""The real server on a loopback port with the bundled model, driven by the openai SDK, with either engine."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from tests.conftest import metric_value, wait_until

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_chat_answers_and_reports_usage(client):
    reply = client.chat.completions.create(model="smollm2-135m-instruct", messages=QUESTION, temperature=0, max_tokens=20)
    choice = reply.choices[0]
    assert "Paris" in choice.message.content
    assert choice.message.role == "assistant" and choice.finish_reason == "stop"
    assert reply.usage.prompt_tokens > 10 and reply.usage.completion_tokens > 3
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streamed_chat_equals_non_streamed_and_ends_with_usage(client):
    plain = client.chat.completions.create(model="smollm2-135m-instruct", messages=QUESTION, temperature=0, max_tokens=16)
    chunks = list(
        client.chat.completions.create(
            model="smollm2-135m-instruct", messages=QUESTION, temperature=0, max_tokens=16, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_streamed_completion_equals_non_streamed(client):
    kwargs = dict(model="smollm2-135m-instruct", prompt="Once upon a time", temperature=0, max_tokens=24)
    plain = client.completions.create(**kwargs)
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kwargs))
    assert streamed == plain.choices[0].text and len(plain.choices[0].text) > 20
    assert plain.choices[0].finish_reason == "length" and plain.usage.completion_tokens == 24


def test_every_streamed_token_is_a_chunk_even_without_text_of_its_own(client):
    """As vLLM streams: a token that adds no text (here the end-of-text token, skipped in the text, pushed by a logit
    bias and not ending the output) still sends its chunk, so a client sees its first token when it comes."""
    end_of_text = 0  # the bundled model's <|endoftext|>, a special token
    chunks = [c for c in client.completions.create(model="smollm2-135m-instruct", prompt="Once upon a time", temperature=0,
                                                   max_tokens=6, logit_bias={str(end_of_text): 100}, stream=True,
                                                   extra_body={"ignore_eos": True}) if c.choices]
    assert [c.choices[0].text for c in chunks] == [""] * 6
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_string_is_excluded(client):
    kwargs = dict(model="smollm2-135m-instruct", prompt="1, 2, 3, 4,", temperature=0, max_tokens=30)
    full = client.completions.create(**kwargs).choices[0].text
    assert " 7," in full
    for stream in (False, True):
        reply = client.completions.create(stop=[" 7"], stream=stream, **kwargs)
        if stream:
            text = "".join(c.choices[0].text for c in reply)
        else:
            assert reply.choices[0].finish_reason == "stop"
            text = reply.choices[0].text
        assert text == full[: full.index(" 7")]


def test_seed_reproduces_samples_and_n_gives_two_choices(client):
    kwargs = dict(model="smollm2-135m-instruct", prompt="My favourite animal is", temperature=1.0, max_tokens=12, n=2,
                  extra_body={"ignore_eos": True})  # every choice runs to max_tokens, so usage is exact
    first = client.completions.create(seed=1234, **kwargs)
    again = client.completions.create(seed=1234, **kwargs)
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    other = client.completions.create(seed=99, **kwargs)
    assert [c.text for c in other.choices] != [c.text for c in first.choices]
    assert first.usage.completion_tokens == 2 * 12


def test_logprobs_in_both_endpoints(client):
    chat = client.chat.completions.create(model="smollm2-135m-instruct", messages=QUESTION, temperature=0, max_tokens=5, logprobs=True, top_logprobs=3)
    entries = chat.choices[0].logprobs.content
    assert len(entries) == 5 and all(len(e.top_logprobs) == 3 for e in entries)
    assert all(e.logprob <= 0 and e.top_logprobs[0].logprob >= e.logprob - 1e-6 for e in entries)
    assert entries[0].token == entries[0].top_logprobs[0].token  # greedy takes the most likely token
    completion = client.completions.create(model="smollm2-135m-instruct", prompt="Hello", temperature=0, max_tokens=4, logprobs=2)
    lp = completion.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == completion.choices[0].text


def test_penalties_and_top_k_are_accepted(client):
    reply = client.completions.create(
        model="smollm2-135m-instruct", prompt="Repeat after me: la la la la", max_tokens=10, temperature=0.7,
        presence_penalty=1.0, frequency_penalty=1.0, seed=3, extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.2},
    )
    assert reply.usage.completion_tokens >= 1


def test_late_short_request_finishes_before_early_long_one(client, server):
    finished = {}

    def long_request():
        stream = client.completions.create(
            model="smollm2-135m-instruct", prompt="Write a long story:", max_tokens=120, temperature=0, stream=True, extra_body={"ignore_eos": True}
        )
        for _ in stream:
            pass
        finished["long"] = time.monotonic()

    worker = threading.Thread(target=long_request)
    worker.start()
    assert wait_until(lambda: metric_value(server, "vllm:num_requests_running") >= 1)
    client.completions.create(model="smollm2-135m-instruct", prompt="Hi", max_tokens=3, temperature=0)
    finished["short"] = time.monotonic()
    worker.join(timeout=120)
    assert finished["short"] < finished["long"]


def test_models_tokenize_detokenize_version_health(server):
    models = httpx.get(f"{server}/v1/models").json()
    assert models["data"][0]["id"] == "smollm2-135m-instruct" and models["data"][0]["max_model_len"] == 8192
    tokens = httpx.post(f"{server}/tokenize", json={"prompt": "Hello world"}).json()
    assert tokens["count"] == len(tokens["tokens"]) > 0
    text = httpx.post(f"{server}/detokenize", json={"tokens": tokens["tokens"]}).json()
    assert text["prompt"] == "Hello world"
    chat_tokens = httpx.post(f"{server}/tokenize", json={"messages": QUESTION}).json()
    assert chat_tokens["count"] > tokens["count"]
    assert httpx.get(f"{server}/version").json()["version"]
    assert httpx.get(f"{server}/health").status_code == 200


def test_metrics_use_vllm_names(server, client):
    client.completions.create(model="smollm2-135m-instruct", prompt="Hi", max_tokens=2, temperature=0)
    text = httpx.get(f"{server}/metrics").text
    for name in (
        "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:time_to_first_token_seconds_bucket",
        "vllm:inter_token_latency_seconds_bucket", "vllm:e2e_request_latency_seconds_bucket",
        "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
    ):
        assert name in text
    assert metric_value(server, "vllm:generation_tokens_total") >= 2


def test_disconnect_frees_the_sequence(server):
    aborted_before = metric_value(server, "vllm:request_success_total", finished_reason="abort")
    body = {"prompt": "a", "max_tokens": 250, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=600) as response:
        lines = response.iter_lines()
        for line in lines:
            if line.startswith("data:"):
                break
        assert metric_value(server, "vllm:num_requests_running") == 1
    assert wait_until(lambda: metric_value(server, "vllm:num_requests_running") == 0, timeout=120)
    assert wait_until(lambda: metric_value(server, "vllm:request_success_total", finished_reason="abort") == aborted_before + 1, timeout=10)


def test_non_streaming_disconnect_frees_the_sequence(server):
    aborted_before = metric_value(server, "vllm:request_success_total", finished_reason="abort")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server}/v1/completions", json={"prompt": "a", "max_tokens": 250, "ignore_eos": True, "model": "smollm2-135m-instruct"}, timeout=0.5)
    assert wait_until(lambda: metric_value(server, "vllm:request_success_total", finished_reason="abort") == aborted_before + 1, timeout=10)
    assert metric_value(server, "vllm:num_requests_running") == 0


def test_plain_responses_have_openai_shape_and_openapi_documents_extensions(server):
    body = {"model": "smollm2-135m-instruct", "messages": QUESTION, "max_tokens": 4, "temperature": 0}
    reply = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60).json()
    assert set(reply) == {"id", "object", "created", "model", "choices", "usage"}
    assert set(reply["choices"][0]) == {"index", "message", "logprobs", "finish_reason"}
    assert set(reply["choices"][0]["message"]) == {"role", "content"}
    with httpx.stream("POST", f"{server}/v1/completions", timeout=60,
                      json={"model": "smollm2-135m-instruct", "prompt": "Paris is", "max_tokens": 3, "stream": True}) as stream:
        events = [line.removeprefix("data: ") for line in stream.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    first = httpx.Response(200, content=events[0]).json()
    assert set(first) == {"id", "object", "created", "model", "choices"}  # usage only with include_usage
    assert set(first["choices"][0]) == {"index", "text", "logprobs", "finish_reason"}

    schema = httpx.get(f"{server}/openapi.json", timeout=10).json()
    components = schema["components"]["schemas"]
    for choice in ("CompletionChoice", "ChatChoice", "ChatStreamChoice"):
        assert {"nbce_context_ids", "key", "value", "score"} <= set(components[choice]["properties"]), choice
    chat = schema["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    assert chat["application/json"]["schema"]["$ref"].endswith("/ChatCompletionResponse")
    assert chat["text/event-stream"]["schema"]["$ref"].endswith("/ChatCompletionChunk")
    assert "ChatCompletionChunk" in components and "ChatDelta" in components


def test_a_streamed_chat_sends_its_role_chunk_with_the_first_token_not_before():
    """vLLM sends the role with the first token; a role chunk sent at once would be a client's 'first token' (vLLM's
    benchmark client takes its TTFT there) while the prompt is still being read."""
    import asyncio

    from longserve.server.choice_stream import Choice
    from longserve.server.engine.base import SeqDelta
    from longserve.server.protocol import ChatCompletionRequest
    from longserve.server.serve_chat import chunks

    first_token = asyncio.Event()
    choice = Choice(index=0)

    class OneTokenStream:  # what chunks() reads of a ChoiceStream
        choices, extensions, engine = [choice], [], None

        def header(self):
            return {"id": "chatcmpl-test", "created": 0, "model": "smollm2-135m-instruct"}

        def fields(self, index, finished):
            return {}

        async def updates(self):
            await first_token.wait()
            choice.text = "Paris"
            yield choice, SeqDelta(index=0, text="Paris", token_ids=[1], logprobs=None, finish_reason="stop",
                                   completion_tokens=1)

    async def scenario():
        body = ChatCompletionRequest(model="smollm2-135m-instruct", messages=QUESTION, stream=True)
        events = chunks(body, OneTokenStream())
        first = asyncio.ensure_future(anext(events))
        for _ in range(10):
            await asyncio.sleep(0)
        assert not first.done()  # no token yet: nothing sent
        first_token.set()
        role = await first
        assert role.choices[0].delta.role == "assistant"
        token = await anext(events)
        assert token.choices[0].delta.content == "Paris" and token.choices[0].finish_reason == "stop"

    asyncio.run(scenario())
