"""Request ids: `X-Request-Id` in (or one made up), echoed out, and on every log line.

The id lives in a context variable for the request's task, so every log
record made while serving it (ours, uvicorn's access line, the vLLM engine's)
carries it as `%(request_id)s`; the native engine's thread sets it around the
log lines it writes about a request (`log_context`). Records made outside any
request carry "-".
"""

from __future__ import annotations

import contextvars
import logging
import re
import uuid
from contextlib import contextmanager

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
ACCEPTED_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")  # what a client may send; anything else gets a fresh id
HEADER = b"x-request-id"


def install_log_ids() -> None:
    """Give every log record a `request_id` attribute (once per process)."""
    previous = logging.getLogRecordFactory()
    if getattr(previous, "adds_request_id", False):
        return

    def factory(*args, **kwargs):
        record = previous(*args, **kwargs)
        record.request_id = REQUEST_ID.get()
        return record

    factory.adds_request_id = True
    logging.setLogRecordFactory(factory)


@contextmanager
def log_context(request_id: str):
    token = REQUEST_ID.set(request_id)
    try:
        yield
    finally:
        REQUEST_ID.reset(token)


class RequestIds:
    """ASGI middleware: take or make the id, keep it for the request's task, and echo it in the response."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers", [])).get(HEADER, b"").decode("latin-1")
        request_id = given if ACCEPTED_ID.fullmatch(given) else f"req-{uuid.uuid4().hex[:16]}"
        REQUEST_ID.set(request_id)

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (HEADER, request_id.encode())]}
            await send(message)

        return await self.app(scope, receive, send_with_id)
