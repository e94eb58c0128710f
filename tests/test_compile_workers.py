"""Grammars compile in worker processes that can be killed (server/extensions/compile_workers.py): a compile past
--grammar-compile-timeout, or whose client left, ends with its process; one queued behind busy workers gets a 503;
and a plain request sent beside a costly grammar is answered before that grammar's request ends.

COSTLY takes minutes to compile here (300 optional literals take 6.6 s and the cost grows faster than the square
of the count), far past every timeout used below on any machine; no assertion is about a time."""

from __future__ import annotations

import asyncio
import multiprocessing
import threading

import httpx
import pytest

from server.engine.base import GrammarSpec
from server.extensions.compile_workers import CompilerBusy, CompileTimeout, CompileWorkers
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


@pytest.mark.server
def test_a_plain_request_beside_costly_grammars_is_answered_first_and_their_compiles_end(tokenizer):
    """Two costly grammars take both workers; a plain request sent after them is answered before either ends.
    They end with a 400 naming the flag and their processes are gone; a grammar whose client left is killed
    though its timeout is far away."""
    engine = make_engine(tiny_model("llama", seed=5), tokenizer, max_model_len=128)
    with running_server(engine, grammar_compile_timeout=5.0) as url:
        port = url.rsplit(":", 1)[1]

        def ask(grammar=None, timeout=600):
            extra = {"structured_outputs": {"grammar": grammar}} if grammar else {}
            return httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 3, **extra}, timeout=timeout)

        ended = []
        costly = [threading.Thread(target=lambda: ended.append(ask(COSTLY))) for _ in range(2)]
        for thread in costly:
            thread.start()
        assert wait_until(lambda: len(alive(f"grammar-compile:{port}")) == 2, timeout=120)
        assert ask().status_code == 200
        assert ended == []  # the plain answer came first
        for thread in costly:
            thread.join(600)
        assert [reply.status_code for reply in ended] == [400, 400]
        assert all("--grammar-compile-timeout" in reply.json()["error"]["message"] for reply in ended)
        assert alive(f"grammar-compile:{port}") == []
        assert ask("root ::= \"yes\" | \"no\"").status_code == 200

    with running_server(make_engine(tiny_model("llama", seed=5), tokenizer, max_model_len=128), grammar_compile_timeout=3600) as url:
        port = url.rsplit(":", 1)[1]
        try:
            ask_costly = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "structured_outputs": {"grammar": COSTLY}},
                                    timeout=httpx.Timeout(600, read=1.0))
        except httpx.ReadTimeout:
            ask_costly = None
        assert ask_costly is None  # the client gave up waiting
        assert wait_until(lambda: len(alive(f"grammar-compile:{port}")) == 1, timeout=120)  # its worker was busy...
        assert wait_until(lambda: alive(f"grammar-compile:{port}") == [], timeout=120)  # ...and was killed when it left
