"""/v1/tries: register, list, inspect and delete knowledge bases (server/knowledge.py).

    POST   /v1/tries          {"name", "entries": [{"key", "value"}], "lead": ""}
    PUT    /v1/tries/{name}   JSON lines, one {"key", "value"} per line (large bases); ?lead=%20
    GET    /v1/tries          stats of every base
    GET    /v1/tries/{name}   stats of one
    DELETE /v1/tries/{name}

Building runs in a worker thread, so serving goes on meanwhile.
"""

from __future__ import annotations

import asyncio
import json

from fastapi import APIRouter, Request
from pydantic import Field

from server.errors import APIError
from server.engine.base import KeyConstraint
from server.knowledge import EntryError, KnowledgeStore, build
from server.protocol import Constraint, RequestBody

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
    return entries


async def register(request: Request, name: str, entries: list, lead: str) -> dict:
    store: KnowledgeStore = request.app.state.knowledge
    try:
        store.check_name(name)
    except ValueError as exc:
        raise APIError(400, str(exc), "name") from None
    tokenizer = request.app.state.engine.tokenizer
    try:
        base = await asyncio.to_thread(build, name, entries, tokenizer, lead, store.limits)
        await asyncio.to_thread(store.put, base)
    except EntryError as exc:
        raise APIError(400, str(exc), "entries") from None
    except MemoryError as exc:
        raise APIError(413, str(exc), "entries") from None
    return base.stats()


def find(request: Request, name: str):
    base = request.app.state.knowledge.bases.get(name)
    if base is None:
        known = ", ".join(sorted(request.app.state.knowledge.bases)) or "none yet"
        raise APIError(404, f"no trie named {name!r}; this server has: {known}", "name", "trie_not_found")
    return base


async def key_constraint(request: Request, constraint: Constraint | None, beam_width: int | None = None):
    """The engine's KeyConstraint and the base that answers for it, or (None, None).

    Inline choices are tokenized and built into a trie in a worker thread
    (about 0.2 s for 10,000 choices): other requests' streams go on meanwhile."""
    if constraint is None:
        return None, None
    engine = request.app.state.engine
    if constraint.trie is not None:
        base = find(request, constraint.trie)
    else:
        entries = [{"key": choice, "value": None} for choice in constraint.choices]
        try:
            base = await asyncio.to_thread(build, "inline", entries, engine.tokenizer, constraint.lead,
                                           request.app.state.knowledge.limits)
        except EntryError as exc:
            raise APIError(400, str(exc).replace("entry", "choice", 1), "constraint.choices") from None
    if beam_width is not None and beam_width > base.num_keys:
        raise APIError(400, f"a beam of n = {beam_width} asks for more distinct keys than the {base.num_keys} there are; lower n", "n")
    if beam_width is not None and beam_width > engine.max_num_seqs:
        raise APIError(400, f"a beam of n = {beam_width} does not fit --max-num-seqs {engine.max_num_seqs}; lower n", "n")
    end_token = engine.tokenizer.eos_token_id
    if end_token is None:
        raise APIError(400, "this model has no end-of-sequence token to end a key with", "constraint")
    return KeyConstraint(base.trie, end_token), base


def key_fields(base, entry: int | None, score: float | None = None) -> dict:
    """The extension fields of a constrained choice: its key and the stored value once complete,
    and with beam search its score (cumulative log-probability)."""
    if base is None:
        return {}
    fields = {"key": None, "value": None} if entry is None else {"key": base.key(entry), "value": base.value(entry)}
    if score is not None:
        fields["score"] = score
    return fields


def trie_routes() -> APIRouter:
    router = APIRouter()

    @router.post("/tries")
    async def create(body: TrieUpload, request: Request):
        return await register(request, body.name, body.entries, body.lead)

    @router.put("/tries/{name}")
    async def upload_lines(name: str, request: Request, lead: str = ""):
        if len(lead) > MAX_LEAD_CHARS:
            raise APIError(400, f"lead has {len(lead)} characters; at most {MAX_LEAD_CHARS}", "lead")
        try:
            entries = parse_json_lines(await request.body())
        except EntryError as exc:
            raise APIError(400, str(exc), "entries") from None
        return await register(request, name, entries, lead)

    @router.get("/tries")
    async def list_tries(request: Request):
        return {"object": "list", "data": [b.stats() for b in request.app.state.knowledge.bases.values()]}

    @router.get("/tries/{name}")
    async def show(name: str, request: Request):
        return find(request, name).stats()

    @router.delete("/tries/{name}")
    async def delete(name: str, request: Request):
        find(request, name)
        request.app.state.knowledge.delete(name)
        return {"name": name, "object": "trie", "deleted": True}

    return router
