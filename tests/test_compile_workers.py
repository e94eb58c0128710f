"""Grammars compile in worker processes that can be killed (server/extensions/compile_workers.py): a compile past
--grammar-compile-timeout, or whose client left, ends with its process; one queued behind busy workers gets a 503;
and a plain request sent beside a costly grammar is answered before that grammar's request ends.

COSTLY takes minutes to compile here (300 optional literals take 6.6 s and the cost grows faster than the square
of the count), far past every timeout used below on any machine; no assertion is about a time."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import socket

import httpx
import pytest

from longserve.server.engine.base import GrammarSpec
from longserve.server.extensions.compile_workers import CompilerBusy, CompileTimeout, CompileWorkers
from tests.conftest import make_engine, running_server, tiny_model, wait_until

VOCAB = 49152
COSTLY = "root ::= " + " ".join(['"a"?'] * 1000)
CHEAP = "[0-9]+"


def alive(name: str) -> list:
    return [process for process in multiprocessing.active_children() if process.name == name]


@pytest.fixture()
def workers(tokenizer):
    pool = CompileWorkers(tokenizer, VOCAB, count=1, memory_bytes=4 * 2**30, name="grammar-compile:test")
    yield pool
    pool.shutdown()


def test_a_compile_past_its_timeout_is_killed_and_the_next_grammar_gets_a_fresh_worker(workers):
    async def run():
        with pytest.raises(CompileTimeout):
            await workers.compile(GrammarSpec("grammar", COSTLY), timeout=2.0)
        assert alive("grammar-compile:test") == []
        answer, (backend, text) = await workers.compile(GrammarSpec("regex", CHEAP), timeout=600)
        assert answer == "ok" and backend == "xgrammar" and text
        assert len(alive("grammar-compile:test")) == 1  # kept for the next grammar

    asyncio.run(run())


def test_a_compile_queued_behind_busy_workers_is_refused_and_a_cancelled_one_is_killed(workers):
    async def run():
        costly = asyncio.create_task(workers.compile(GrammarSpec("grammar", COSTLY), timeout=600))
        while not alive("grammar-compile:test"):
            await asyncio.sleep(0.05)
        with pytest.raises(CompilerBusy):
            await workers.compile(GrammarSpec("regex", CHEAP), timeout=5.0)
        costly.cancel()
        with pytest.raises(asyncio.CancelledError):
            await costly
        assert alive("grammar-compile:test") == []

    asyncio.run(run())


def test_a_worker_answers_what_the_compilers_refuse_in_words(workers):
    async def run():
        return await workers.compile(GrammarSpec("grammar", "root ::= a\na ::= b\nb ::= a"), timeout=600)

    assert asyncio.run(run()) == ("error", "it accepts no text at all (no token can begin an answer): look for a "
                                           "character class that matches nothing, or rules that only refer to each other")


def send_and_hold(url: str, body: dict) -> socket.socket:
    """POST `body` on a raw connection left open: closing it is the client leaving, at a moment the test picks."""
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    connection = socket.create_connection((host, int(port)), timeout=600)
    connection.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (host.encode(), len(payload), payload))
    return connection


def answered(connection: socket.socket) -> bool:
    """Whether the server has written anything back, or closed the connection."""
    connection.setblocking(False)
    try:
        connection.recv(1, socket.MSG_PEEK)
        return True
    except BlockingIOError:
        return False
    finally:
        connection.setblocking(True)


@pytest.mark.server
def test_a_plain_request_beside_costly_grammars_is_answered_first_and_a_compile_whose_client_left_is_killed(tokenizer):
    """Two costly grammars take both workers; a plain request sent after them is answered while both still
    compile. Each compile's process is killed when its client leaves, though its timeout is an hour away; the
    next grammar gets a fresh worker."""
    engine = make_engine(tiny_model("llama", seed=5), tokenizer, max_model_len=128)
    with running_server(engine, grammar_compile_timeout=3600) as url:
        port = url.rsplit(":", 1)[1]
        costly_body = {"prompt": "Hi", "max_tokens": 3, "structured_outputs": {"grammar": COSTLY}}
        costly = [send_and_hold(url, costly_body) for _ in range(2)]
        assert wait_until(lambda: len(alive(f"grammar-compile:{port}")) == 2, timeout=300)
        plain = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 3}, timeout=600)
        assert plain.status_code == 200
        assert len(alive(f"grammar-compile:{port}")) == 2 and not any(answered(c) for c in costly)  # still compiling
        costly[0].close()
        assert wait_until(lambda: len(alive(f"grammar-compile:{port}")) == 1, timeout=120)
        costly[1].close()
        assert wait_until(lambda: alive(f"grammar-compile:{port}") == [], timeout=120)
        cheap = {"prompt": "Hi", "max_tokens": 3, "structured_outputs": {"grammar": "root ::= \"yes\" | \"no\""}}
        assert httpx.post(f"{url}/v1/completions", json=cheap, timeout=600).status_code == 200


@pytest.mark.server
def test_a_compile_past_its_timeout_ends_its_request_with_a_400_naming_the_flag(tokenizer):
    engine = make_engine(tiny_model("llama", seed=5), tokenizer, max_model_len=128)
    with running_server(engine, grammar_compile_timeout=3.0) as url:
        port = url.rsplit(":", 1)[1]
        reply = httpx.post(f"{url}/v1/completions", timeout=600,
                           json={"prompt": "Hi", "max_tokens": 3, "structured_outputs": {"grammar": COSTLY}})
        assert reply.status_code == 400
        assert "--grammar-compile-timeout" in reply.json()["error"]["message"]
        assert alive(f"grammar-compile:{port}") == []
