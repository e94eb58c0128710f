"""Graceful drain: what the server does between SIGTERM and its exit.

1. Stop accepting: every new request gets 503 with `Connection: close`
   (/health says "draining", so a load balancer takes the replica out).
2. Let the requests in flight finish, for up to --shutdown-timeout seconds.
3. End the rest: the engine fails them with a 503 error, which a stream
   sends as its last event before `[DONE]` and a clean end of the body.
4. Exit 0.
The HTTP server (http_server.py) runs these steps; the gate below is the
part that sits in front of the app.
"""

from __future__ import annotations

import asyncio
import logging
import time

from longserve.server.errors import error_response

log = logging.getLogger("longserve.drain")
UNGATED_PATHS = ("/health", "/metrics")  # they answer while draining, and are not waited for
FINAL_EVENTS_SECONDS = 5.0  # after the engine ends what is left: time for those answers to go out


class Drain:
    """The server's draining flag and the requests in flight behind the gate."""

    def __init__(self):
        self.draining = False
        self.in_flight = 0

    async def run(self, engine, shutdown_timeout: float) -> None:
        """Steps 1-3; returns when nothing is in flight, or the final answers had their time."""
        self.draining = True
        log.info("draining: %d request(s) in flight get up to %.0f s (--shutdown-timeout); new requests get 503",
                 self.in_flight, shutdown_timeout)
        if not await self.wait_idle(shutdown_timeout):
            log.warning("draining: %d request(s) still in flight after %.0f s; ending them", self.in_flight, shutdown_timeout)
            engine.fail_all(f"the server is shutting down and could not finish this request within "
                            f"{shutdown_timeout:g} s (--shutdown-timeout); send it again", 503)
            await self.wait_idle(FINAL_EVENTS_SECONDS)
        log.info("drained")

    async def wait_idle(self, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return not self.in_flight


class DrainGate:
    """ASGI middleware: counts requests in flight; while draining, answers new ones 503 and closes."""

    def __init__(self, app, drain: Drain):
        self.app = app
        self.drain = drain

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in UNGATED_PATHS:
            return await self.app(scope, receive, send)
        if self.drain.draining:
            refused = error_response(503, "the server is shutting down; send the request to another replica",
                                     headers={"Connection": "close"})
            return await refused(scope, receive, send)
        self.drain.in_flight += 1
        try:
            return await self.app(scope, receive, send)
        finally:
            self.drain.in_flight -= 1
