"""Issue 15's probe, case by case, by its exact bodies: each is a 4xx that names the field, and the
engine keeps serving. On a tiny random-weight model behind the real HTTP server (h11 and its limits)."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from tests.conftest import make_engine, running_server
from tests.test_server_errors import assert_openai_error, post


def still_serving(url: str) -> None:
    """The engine is alive: /health is 200 and a sampled request completes."""
    assert httpx.get(f"{url}/health").status_code == 200
    response = post(url, "/v1/completions", {"prompt": "Hello", "max_tokens": 4, "temperature": 1.0})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["finish_reason"] in ("length", "stop")


@pytest.mark.parametrize(
    "body, param, words",
    [
        ({"prompt": "Hello", "max_tokens": 4, "top_k": 100000000000000000000}, "top_k", ["2147483647"]),
        ({"prompt": "Hello", "max_tokens": 4, "position": {"type": "rerope", "window": 100000000000000000000}},
         "position.window", ["16777216"]),
        ({"prompt": "Hello", "max_tokens": 4, "repetition_penalty": 5e-324}, "repetition_penalty", ["0.01"]),
        ({"prompt": "Hello", "max_tokens": 4, "repetition_penalty": 5e-324, "stream": True}, "repetition_penalty", []),
        ({"prompt": "Hello", "max_tokens": 4, "position": {"type": "yarn", "factor": 2, "beta_fast": 1e308}},
         "position.beta_fast", []),
        ({"prompt": "x", "logit_bias": {"²": 1}}, "logit_bias", ["token id"]),
        ({"prompt": "x", "logit_bias": {"--5": 1}}, "logit_bias", ["token id"]),
        ({"prompt": "x", "max_tokens": 2**40}, "max_tokens", []),
        ({"prompt": "x", "seed": 2**64}, "seed", []),
        ({"prompt": "x", "nbce": {"beta": 1e308}, "contexts": ["a"]}, "nbce.beta", []),
        ({"prompt": "x", "position": {"type": "ntk-mixed", "factor": 2, "b": 5e-324}}, "position.b", []),
    ],
)
def test_probe_bodies_get_400_and_the_engine_goes_on(tiny_server, body, param, words):
    assert_openai_error(post(tiny_server, "/v1/completions", body), 400, *words, param=param)
    still_serving(tiny_server)


@pytest.mark.parametrize(
    "raw, param",
    [
        ('{"prompt": "Hello", "max_tokens": 4, "position": {"type": "leaky-rerope", "k": Infinity}}', "position.k"),
        ('{"prompt": "Hello", "temperature": NaN}', "temperature"),
        ('{"prompt": "Hello", "nbce": {"top_p": NaN}, "contexts": ["a"]}', "nbce.top_p"),
    ],
)
def test_non_finite_numbers_get_400(tiny_server, raw, param):
    response = httpx.post(f"{tiny_server}/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert_openai_error(response, 400, param=param)
    still_serving(tiny_server)


LONE = "hi \ud800"


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/completions", {"prompt": LONE, "max_tokens": 4}, "prompt"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONE}]}, "messages.0.content"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": LONE}]}]},
         "messages.0.content.0.text"),
        ("/v1/completions", {"prompt": "q", "contexts": ["fine", LONE]}, "contexts.1"),
        ("/v1/completions", {"prompt": "q", "constraint": {"choices": ["a", LONE]}}, "constraint.choices.1"),
        ("/v1/completions", {"prompt": "q", "stop": [LONE]}, "stop.0"),
        ("/v1/tries", {"name": "kb", "entries": [{"key": LONE, "value": 1}]}, "entries.0.key"),
        ("/tokenize", {"prompt": LONE}, "prompt"),
    ],
)
def test_lone_surrogates_get_400_naming_the_field(tiny_server, path, body, param):
    # json.dumps writes the surrogate as the escape "\ud800", as the probe sent it
    response = httpx.post(f"{tiny_server}{path}", content=json.dumps(body), headers={"content-type": "application/json"})
    assert_openai_error(response, 400, "not valid Unicode", param=param)
    still_serving(tiny_server)


def test_raw_surrogate_bytes_in_the_body_get_400(tiny_server):
    raw = b'{"prompt": "hi \xed\xa0\x80", "max_tokens": 4}'
    response = httpx.post(f"{tiny_server}/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"
    still_serving(tiny_server)


def test_trie_upload_with_bad_text_says_where(tiny_server):
    lines = b'{"key": "a", "value": 1}\n{"key": "b\xff", "value": 2}\n'
    response = httpx.put(f"{tiny_server}/v1/tries/kb", content=lines)
    assert_openai_error(response, 400, "line 2", "0xff", param="entries")
    escaped = '{"key": "a", "value": 1}\n{"key": "b", "value": "\\ud800"}\n'.encode()
    response = httpx.put(f"{tiny_server}/v1/tries/kb", content=escaped)
    assert_openai_error(response, 400, "entry 2", "value", "not valid Unicode", param="entries")


@pytest.mark.server
def test_n_that_can_never_fit_is_400_not_429(tiny_llama, tokenizer):
    engine = make_engine(tiny_llama, tokenizer, max_num_seqs=2, max_waiting=2, max_model_len=128)
    with running_server(engine) as url:
        response = post(url, "/v1/completions", {"prompt": "Hello", "max_tokens": 4, "n": 5})
        assert_openai_error(response, 400, "--max-num-seqs 2", "--max-waiting 2", "lower n")
        assert "retry-after" not in response.headers
        still_serving(url)


def test_request_id_is_echoed_or_made(tiny_server):
    given = httpx.get(f"{tiny_server}/v1/models", headers={"X-Request-Id": "abc-123"})
    assert given.headers["x-request-id"] == "abc-123"
    made = httpx.get(f"{tiny_server}/v1/models")
    assert made.headers["x-request-id"].startswith("req-")
    odd = httpx.get(f"{tiny_server}/v1/models", headers={"X-Request-Id": "no spaces allowed"})
    assert odd.headers["x-request-id"].startswith("req-")


# ---- slow and huge clients ----------------------------------------------------
# The strict server cuts at 1 s; SAFETY is how long a test waits for that cut before it calls it missing (a
# socket left open by a server without the cut would hang the test forever without it).
SAFETY = 30.0


@pytest.fixture(scope="module")
def strict_server(tiny_llama, tokenizer):
    engine = make_engine(tiny_llama, tokenizer, max_num_seqs=2, max_model_len=128)
    with running_server(engine, header_timeout=1.0, body_timeout=1.0, max_header_bytes=8192) as url:
        yield url


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=SAFETY)
    return sock


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def test_a_huge_header_is_refused_without_reading_it_whole(strict_server):
    sock = connect(strict_server)
    sent, offered = 0, 32 * 1024 * 1024
    try:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ")
        try:
            while sent < offered:  # 1 KiB at a time; the server stops reading long before
                sock.sendall(b"a" * 1024)
                sent += 1024
        except OSError:
            pass  # the server closed the connection
        answer = read_all(sock)
    finally:
        sock.close()
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert b"--max-header-bytes" in answer
    assert sent < offered  # the connection closed under the client: the rest was never read


def test_slow_headers_are_cut_off(strict_server):
    sock = connect(strict_server)
    try:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        started = time.monotonic()
        assert read_all(sock) == b""  # closed by the server
        assert 0.8 < time.monotonic() - started  # not before --header-timeout (1 s)
    finally:
        sock.close()


def test_an_idle_connection_is_cut_off(strict_server):
    sock = connect(strict_server)
    try:
        assert read_all(sock) == b""  # within SAFETY, or recv times out
    finally:
        sock.close()


def test_a_body_that_stops_arriving_gets_408(strict_server):
    sock = connect(strict_server)
    try:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"prompt\": ")
        answer = read_all(sock)  # within SAFETY, or recv times out
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"--body-timeout" in answer
    finally:
        sock.close()
    assert httpx.get(f"{strict_server}/health").status_code == 200
