"""Grammar compiles in worker processes: one still running at --grammar-compile-timeout, or whose client left,
is killed, and its memory goes with it.

xgrammar compiles in C++ and cannot be stopped from Python. In a thread, a costly grammar (1,000 optional
literals: minutes) kept its thread and its memory long after its client had its 400, and six of them took
every thread and 2 GiB. A process can be killed. Each worker compiles one grammar at a time under an
address-space limit (--grammar-compile-memory) and sends the result back serialized (xgrammar's JSON,
llguidance's grammar text); loading it here takes milliseconds for a schema.

Written by hand because concurrent.futures' ProcessPoolExecutor cannot kill one task: a worker that dies
breaks the whole pool.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import resource
import threading
from concurrent.futures import ThreadPoolExecutor

from longserve.server.engine.base import GrammarSpec
from longserve.server.errors import TOO_DEEP
from longserve.server.extensions.grammar_compile import compile_checked, grammar_compiler
from longserve.server.extensions.guidance import GuidanceGrammar


class CompilerBusy(Exception):
    """Every worker was busy with other requests' grammars for the whole timeout."""


class CompileTimeout(Exception):
    """The grammar was still compiling at the timeout; its worker was killed."""


def serve_compiles(conn, tokenizer, vocab_size: int, memory_bytes: int) -> None:
    """A worker's life: compile each spec it is sent and send back ("ok", (backend, serialized)) or
    ("error", message); its own cache is off, the server keeps the compiled grammars."""
    os.nice(10)  # the server's requests come first on the CPU: a costly compile uses what they leave
    compiler = grammar_compiler(tokenizer, vocab_size, cache_bytes=0)
    if memory_bytes:  # on top of what the worker maps once started (its libraries and token tables)
        mapped = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (mapped + memory_bytes, mapped + memory_bytes))
    conn.send("ready")
    while True:
        try:
            spec = conn.recv()
        except (EOFError, OSError):
            return
        try:
            grammar = compile_checked(compiler, spec, tokenizer, vocab_size)
            if isinstance(grammar, GuidanceGrammar):
                conn.send(("ok", ("llguidance", grammar.text)))
            else:
                conn.send(("ok", ("xgrammar", grammar.serialize_json())))
        except RecursionError:
            conn.send(("error", TOO_DEEP))
        except MemoryError:
            conn.send(("error", "compiling it needs more memory than --grammar-compile-memory allows; simplify it"))
        except (RuntimeError, ValueError) as exc:
            conn.send(("error", str(exc)))


class Worker:
    """One compile process and its end of the pipe; waited for and used from a thread (both block)."""

    def __init__(self, name: str, context, tokenizer, vocab_size: int, memory_bytes: int):
        self.conn, child = context.Pipe()
        self.process = context.Process(target=serve_compiles, args=(child, tokenizer, vocab_size, memory_bytes),
                                       name=name, daemon=True)
        self.process.start()
        child.close()

    def wait_ready(self) -> None:
        if self.conn.recv() != "ready":
            raise RuntimeError("a grammar compile worker did not start")

    def run(self, spec: GrammarSpec) -> tuple:
        self.conn.send(GrammarSpec(spec.kind, spec.value))
        return self.conn.recv()

    def kill(self) -> None:
        self.process.kill()
        self.process.join(10)
        self.conn.close()


class Job:
    """One compile's claim on a worker, so that a caller who gives up can kill the worker, even one still starting."""

    def __init__(self):
        self._lock = threading.Lock()
        self._worker: Worker | None = None
        self._given_up = False

    def attach(self, worker: Worker) -> bool:
        with self._lock:
            self._worker = worker
            return not self._given_up

    def give_up(self) -> Worker | None:
        with self._lock:
            self._given_up = True
            return self._worker


class CompileWorkers:
    """At most `count` grammars compile at once, each in a process of its own; workers start on first use
    (about 3 s: a fresh interpreter, xgrammar and the token tables) and stay for the next grammar."""

    def __init__(self, tokenizer, vocab_size: int, count: int, memory_bytes: int, name: str = "grammar-compile"):
        self.count = count
        self._start_args = (name, multiprocessing.get_context("spawn"), tokenizer, vocab_size, memory_bytes)
        self._idle: list[Worker] = []
        self._all: set[Worker] = set()
        self._lock = threading.Lock()
        self._slots: asyncio.Semaphore | None = None  # made in the server's loop, on first use
        # a worker start or a blocked pipe read per compile
        self._threads = ThreadPoolExecutor(max_workers=2 * count, thread_name_prefix="grammar-compile")

    def _worker_for(self, job: Job) -> Worker:
        """An idle worker, or a new one (in a thread: both block)."""
        with self._lock:
            worker = self._idle.pop() if self._idle else None
        fresh = worker is None
        if fresh:
            worker = Worker(*self._start_args)
            with self._lock:
                self._all.add(worker)
        if not job.attach(worker):
            self._discard(worker)
            raise asyncio.CancelledError()
        if fresh:
            worker.wait_ready()  # EOFError if its caller gave up meanwhile and it was killed
        return worker

    def _discard(self, worker: Worker | None) -> None:
        if worker is None:
            return
        with self._lock:
            self._all.discard(worker)
        worker.kill()

    async def compile(self, spec: GrammarSpec, timeout: float) -> tuple:
        """The worker's answer for `spec`: ("ok", (backend, serialized)) or ("error", message). Raises
        CompilerBusy when no worker came free within `timeout`, CompileTimeout when the compile itself (after its
        worker started) took longer; a compile whose caller is cancelled (its client left) is killed too."""
        loop = asyncio.get_running_loop()
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.count)
        try:
            await asyncio.wait_for(self._slots.acquire(), timeout)
        except asyncio.TimeoutError:
            raise CompilerBusy() from None
        job = Job()
        try:
            worker = await loop.run_in_executor(self._threads, self._worker_for, job)
            answer = await asyncio.wait_for(loop.run_in_executor(self._threads, worker.run, spec), timeout)
        except asyncio.TimeoutError:
            self._discard(job.give_up())
            raise CompileTimeout() from None
        except (EOFError, OSError):  # the worker died: past its memory limit, most likely
            self._discard(job.give_up())
            return "error", "its compile process ended (over --grammar-compile-memory?); simplify it"
        except BaseException:  # cancelled: the client left
            self._discard(job.give_up())
            raise
        finally:
            self._slots.release()
        with self._lock:
            self._idle.append(worker)
        return answer

    def shutdown(self) -> None:
        with self._lock:
            workers, self._all, self._idle = list(self._all), set(), []
        for worker in workers:
            worker.kill()
        self._threads.shutdown(wait=False)
