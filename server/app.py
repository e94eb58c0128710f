"""The FastAPI app: routes, auth, body limit, drain gate, request ids, errors, metrics.

create_app(engine, settings) is all a caller needs; the CLI runs it under
uvicorn and the tests run it on a loopback port.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from contextlib import asynccontextmanager
from typing import Callable

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse

from longserve.server import __version__
from longserve.server.drain import Drain, DrainGate
from longserve.server.errors import APIError, error_response, install_error_handlers
from longserve.server.engine.metrics import Metrics
from longserve.server.knowledge import KnowledgeStore, Limits, keep_in_sync
from longserve.server.extensions.structured import Grammars
from longserve.server.protocol import DetokenizeRequest, TokenizeRequest, check_model, check_token_ids
from longserve.server.request_ids import RequestIds
from longserve.server.responses import STREAM_EVENTS, ChatCompletionResponse, CompletionResponse
from longserve.server.serve_chat import chat_prompt_ids, create_chat_completion
from longserve.server.serve_completion import create_completion
from longserve.server.serve_tries import trie_routes
from longserve.server.settings import ServerSettings


class BodyLimit:
    """Answer 413 to a body over `limit` bytes, whether or not it announces its length, and 408 to a
    body that stops arriving for `timeout` seconds.

    A pure ASGI middleware: it reads the body up front (bounded by the limit)
    and replays it, then hands later receive() calls (disconnects) through.
    """

    def __init__(self, app, limit: int, upload_limit: int, timeout: float):
        self.app = app
        self.limit = limit
        self.upload_limit = upload_limit  # PUT /v1/tries/{name}: a knowledge base as JSON lines
        self.timeout = timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        limit, flag = self.limit, "--max-body-bytes"
        if scope["method"] == "PUT" and scope["path"].startswith("/v1/tries/"):
            limit, flag = self.upload_limit, "--max-upload-bytes"
        too_big = f"the request body is over this server's limit of {limit} bytes ({flag})"
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await error_response(413, too_big)(scope, receive, send)
        chunks, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), self.timeout)
            except asyncio.TimeoutError:
                slow = error_response(408, f"the request body stopped arriving: nothing for {self.timeout:g} s "
                                           "(--body-timeout)", headers={"Connection": "close"})
                return await slow(scope, receive, send)
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return await error_response(413, too_big)(scope, receive, send)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


def require_api_key(request: Request) -> None:
    expected = request.app.state.settings.api_key
    if not expected:
        return
    header = request.headers.get("authorization", "")
    given = header[7:] if header.lower().startswith("bearer ") else ""
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise APIError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")


def stream_responses(path: str) -> dict:
    """The OpenAPI description of a stream (stream: true): server-sent events, each one JSON object of this schema."""
    event = {"$ref": f"#/components/schemas/{STREAM_EVENTS[path].__name__}"}
    return {200: {"content": {"text/event-stream": {"schema": event}},
                  "description": "a JSON object; with stream: true, `data: {event}` lines, then `data: [DONE]`"}}


def with_stream_events(app: FastAPI) -> Callable[[], dict]:
    """app.openapi, plus the schemas of stream events, which no route returns as JSON."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in STREAM_EVENTS.values():
                event = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(event.pop("$defs", {}))
                components[model.__name__] = event
        return app.openapi_schema

    return openapi


def create_app(engine, settings: ServerSettings, metrics: Metrics | None = None,
               on_shutdown: Callable[[], None] | None = None) -> FastAPI:
    """The HTTP app over `engine`. `on_shutdown` runs as the server stops, inside its lifetime: uvicorn
    re-raises SIGTERM/SIGINT once it has stopped, so code after uvicorn.run may never run."""

    @asynccontextmanager
    async def lifespan(_app):
        period = settings.trie_sync_seconds  # replicas that share --data-dir see each other's tries
        syncing = asyncio.create_task(keep_in_sync(app.state.knowledge, period)) if period else None
        yield
        if syncing is not None:
            syncing.cancel()
        app.state.grammars.shutdown()
        if on_shutdown is not None:
            on_shutdown()

    app = FastAPI(title="longserve", version=__version__, lifespan=lifespan)
    app.state.engine = engine
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.started = int(time.time())
    app.state.drain = Drain()
    limits = Limits(settings.max_trie_keys, settings.max_key_chars, settings.max_trie_bytes)
    app.state.knowledge = KnowledgeStore(settings.data_dir / "tries", limits)
    app.state.grammars = Grammars(engine, settings)  # no process starts before the first grammar
    install_error_handlers(app)
    # the last added runs first: ids for everything, then the drain gate, then the body limit
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes, upload_limit=settings.max_upload_bytes,
                       timeout=settings.body_timeout)
    app.add_middleware(DrainGate, drain=app.state.drain)
    app.add_middleware(RequestIds)
    if metrics is not None:
        metrics.watch_step_age(engine.step_age)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])

    @v1.get("/models")
    async def list_models():
        return {
            "object": "list",
            "data": [
                {
                    "id": engine.model_name,
                    "object": "model",
                    "created": app.state.started,
                    "owned_by": "longserve",
                    "root": settings.model,
                    "max_model_len": engine.max_model_len,
                    **{k: v for k, v in engine.describe().items() if k != "max_model_len"},
                }
            ],
        }

    # Fields left unset are left out (server/responses.py): a plain request gets exactly OpenAI's shape.
    v1.post("/completions", response_model=CompletionResponse, response_model_exclude_unset=True,
            responses=stream_responses("/v1/completions"))(create_completion)
    v1.post("/chat/completions", response_model=ChatCompletionResponse, response_model_exclude_unset=True,
            responses=stream_responses("/v1/chat/completions"))(create_chat_completion)
    v1.include_router(trie_routes())
    app.include_router(v1)
    app.openapi = with_stream_events(app)

    @app.get("/health")
    async def health():
        if not engine.is_alive():
            return error_response(503, "the engine has stopped; restart the server")
        if app.state.drain.draining:
            return error_response(503, "the server is shutting down (draining)")
        age = engine.step_age()
        if age > settings.health_stall_seconds:
            return error_response(503, f"the engine has made no progress for {age:.0f} s with work queued "
                                       f"(--health-stall-seconds {settings.health_stall_seconds:g}); restart the server")
        return Response(status_code=200)

    @app.get("/metrics")
    async def prometheus_metrics():
        body = metrics.render() if metrics else b""
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        check_model(body.model, engine.model_name)
        if body.messages is not None:
            tokens = chat_prompt_ids(body.messages, engine.tokenizer, body.add_generation_prompt)
        else:
            tokens = engine.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return {"count": len(tokens), "max_model_len": engine.max_model_len, "tokens": tokens}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        check_model(body.model, engine.model_name)
        check_token_ids(body.tokens, len(engine.tokenizer), "tokens")
        return JSONResponse({"prompt": engine.tokenizer.decode(body.tokens)})

    return app
