"""/v1/tries: register, list, inspect and delete knowledge bases (server/knowledge.py).

    POST   /v1/tries          {"name", "entries": [{"key", "value"}], "lead": ""}
    PUT    /v1/tries/{name}   JSON lines, one {"key", "value"} per line (large bases); ?lead=%20
    GET    /v1/tries          stats of every base
    GET    /v1/tries/{name}   stats of one
    DELETE /v1/tries/{name}

Building runs in a worker thread, so serving goes on meanwhile; a JSON-lines upload is parsed and built in a
process of its own (`build_apart`).
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from fastapi import APIRouter, Request
from pydantic import Field

from longserve.server.errors import TOO_DEEP, APIError
from longserve.server.extensions.keys import find_base
from longserve.server.knowledge import EntryError, KnowledgeBase, KnowledgeStore, build
from longserve.server.protocol import RequestBody

MAX_LEAD_CHARS = 8


class TrieUpload(RequestBody):
    name: str
    entries: list = Field(description='[{"key": string, "value": any JSON}, ...]')
    lead: str = Field("", max_length=MAX_LEAD_CHARS, description="text the model writes before a key, e.g. ' '")


def parse_json_lines(body: bytes) -> list:
    try:
        text = body.decode("utf-8", errors="strict")
    except UnicodeDecodeError as exc:
        line = body[: exc.start].count(b"\n") + 1
        column = exc.start - (body.rfind(b"\n", 0, exc.start) + 1)
        raise EntryError(line, f"not UTF-8 text: byte {exc.start} (line {line}, byte {column} of the line) "
                               f"is 0x{body[exc.start]:02x}; send the body as UTF-8") from None
    entries = []
    for line_number, line in enumerate(text.split("\n"), start=1):  # not splitlines: JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise EntryError(line_number, f"not valid JSON ({exc.msg})") from None
        except RecursionError:
            raise EntryError(line_number, TOO_DEEP) from None
    return entries


def parse_and_build(name: str, body: bytes, tokenizer, lead: str, limits) -> KnowledgeBase:
    os.nice(10)  # the server's own requests come first on the CPU
    return build(name, parse_json_lines(body), tokenizer, lead, limits)


async def build_apart(name: str, body: bytes, tokenizer, lead: str, limits) -> KnowledgeBase:
    """A JSON-lines upload parsed and built in a child process. In a thread, a million-key upload held the event
    loop in pauses of up to 2 s (the collector's passes over the millions of objects a build makes hold the
    interpreter lock) and plain chats waited 13 s; the child hands back only the finished arrays."""
    pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
    try:
        return await asyncio.get_running_loop().run_in_executor(pool, parse_and_build, name, body, tokenizer, lead, limits)
    except BrokenProcessPool:  # killed: out of memory, most likely
        raise MemoryError("the process building this base ended; it may have run out of memory: upload fewer keys") from None
    finally:
        pool.shutdown(wait=False)


async def register(request: Request, name: str, entries: list | bytes, lead: str) -> dict:
    """Build and store the base `name` from `entries` (or the JSON lines that hold them)."""
    store: KnowledgeStore = request.app.state.knowledge
    try:
        store.check_name(name)
    except ValueError as exc:
        raise APIError(400, str(exc), "name") from None
    tokenizer = request.app.state.engine.tokenizer
    try:
        if isinstance(entries, bytes):
            base = await build_apart(name, entries, tokenizer, lead, store.limits)
        else:
            base = await asyncio.to_thread(build, name, entries, tokenizer, lead, store.limits)
        await asyncio.to_thread(store.put, base)
    except EntryError as exc:
        raise APIError(400, str(exc), "entries") from None
    except MemoryError as exc:
        raise APIError(413, str(exc), "entries") from None
    return base.stats()


def trie_routes() -> APIRouter:
    router = APIRouter()

    @router.post("/tries")
    async def create(body: TrieUpload, request: Request):
        return await register(request, body.name, body.entries, body.lead)

    @router.put("/tries/{name}")
    async def upload_lines(name: str, request: Request, lead: str = ""):
        if len(lead) > MAX_LEAD_CHARS:
            raise APIError(400, f"lead has {len(lead)} characters; at most {MAX_LEAD_CHARS}", "lead")
        return await register(request, name, await request.body(), lead)  # parsed with the build, apart

    @router.get("/tries")
    async def list_tries(request: Request):
        return {"object": "list", "data": [b.stats() for b in request.app.state.knowledge.bases.values()]}

    @router.get("/tries/{name}")
    async def show(name: str, request: Request):
        return find_base(request.app.state.knowledge, name).stats()

    @router.delete("/tries/{name}")
    async def delete(name: str, request: Request):
        if not request.app.state.knowledge.delete(name):  # a file this server refused is deleted too
            find_base(request.app.state.knowledge, name)  # the 404, with the names it has
        return {"name": name, "object": "trie", "deleted": True}

    return router
