"""The app under uvicorn, with the limits a public endpoint needs and a graceful exit.

- HTTP/1.1 through h11 with a bound on the request line and headers
  (--max-header-bytes); uvicorn's httptools parser has none, and reads a
  32 MiB header whole.
- A connection whose request headers are not complete within
  --header-timeout seconds is closed (slow clients holding sockets). Neither
  uvicorn nor h11 has such a timer, hence the small protocol subclass below.
  Body reads are bounded by app.BodyLimit (--body-timeout), idle keep-alive
  connections by uvicorn's own --keep-alive-timeout.
- SIGTERM and SIGINT drain (drain.py) and then exit 0; an engine fault exits
  1, so that a supervisor restarts the server.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import signal

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from longserve.server.drain import Drain
from longserve.server.errors import error_body

log = logging.getLogger("longserve.http")
EXIT_ENGINE_FAULT = 1


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request's headers, and errors in OpenAI's shape."""

    def __init__(self, *args, header_timeout: float, max_header_bytes: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self.max_header_bytes = max_header_bytes
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:  # a request line or headers begun, not finished
            self._arm_header_timer()
        elif self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def connection_lost(self, exc) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            log.info("closing a connection from %s: no complete request headers within %g s (--header-timeout)",
                     self.client, self.header_timeout)
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        body = json.dumps(error_body(400, f"invalid HTTP request: malformed, or its request line and headers are over "
                                          f"{self.max_header_bytes} bytes (--max-header-bytes)")).encode()
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body),
                      h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()


class LongserveServer(uvicorn.Server):
    """uvicorn's server with our exit: drain on the first signal, stop at once on the second,
    exit code 1 after an engine fault. Signals are not re-raised after the drain, so the exit code is ours."""

    def __init__(self, config: uvicorn.Config, drain: Drain, engine, shutdown_timeout: float):
        super().__init__(config)
        self.drain, self.engine, self.shutdown_timeout = drain, engine, shutdown_timeout
        self.exit_code = 0
        self._drain_task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame) -> None:
        if self._loop is None:
            self.should_exit = True
        elif self._drain_task is None:
            log.info("%s received", signal.Signals(sig).name)
            self._loop.call_soon_threadsafe(self._start_drain)
        else:
            log.warning("%s received again: ending every request now", signal.Signals(sig).name)
            self._loop.call_soon_threadsafe(self._stop_now)

    def engine_died(self, reason: str) -> None:
        """Called from the engine's thread: its requests have failed already; exit so a supervisor restarts us."""
        log.critical("the engine stopped (%s); exiting with code %d", reason, EXIT_ENGINE_FAULT)
        self.exit_code = EXIT_ENGINE_FAULT
        if self._loop is not None:
            self._loop.call_soon_threadsafe(setattr, self, "should_exit", True)

    def _start_drain(self) -> None:
        async def drain_then_exit():
            await self.drain.run(self.engine, self.shutdown_timeout)
            self.should_exit = True

        self._drain_task = asyncio.ensure_future(drain_then_exit())

    def _stop_now(self) -> None:
        self.engine.fail_all("the server is shutting down now; send the request again", 503)
        self.should_exit = True


def build_server(app, settings, engine) -> LongserveServer:
    protocol = functools.partial(BoundedH11Protocol, header_timeout=settings.header_timeout,
                                 max_header_bytes=settings.max_header_bytes)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level, log_config=None,
                            http=protocol, h11_max_incomplete_event_size=settings.max_header_bytes,
                            timeout_keep_alive=settings.keep_alive_timeout,
                            timeout_graceful_shutdown=int(settings.shutdown_timeout) + 10)  # a backstop behind drain.py
    server = LongserveServer(config, app.state.drain, engine, settings.shutdown_timeout)
    if hasattr(engine, "on_dead"):
        engine.on_dead = server.engine_died
    return server


def serve(app, settings, engine) -> int:
    """Run `app` until it exits; returns the process exit code."""
    server = build_server(app, settings, engine)
    server.run()
    return server.exit_code
