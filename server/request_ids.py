"""Request ids: `X-Request-Id` in (or one made up), echoed out, and on every log line.

The id lives in a context variable for the request's task (server/log_ids.py), so every log
record made while serving it (ours, uvicorn's access line, the vLLM engine's)
carries it as `%(request_id)s`; the engine gets it as the request's `log_id`.
"""

from __future__ import annotations

import re
import uuid

from longserve.server.log_ids import REQUEST_ID

ACCEPTED_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")  # what a client may send; anything else gets a fresh id
HEADER = b"x-request-id"


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
