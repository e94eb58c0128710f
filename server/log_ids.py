"""The id of the request a log line is about, on every log record as `%(request_id)s`.

The id lives in a context variable: the HTTP layer sets it for a request's task (server/request_ids.py), and the
native engine's thread sets it around the lines it writes about a request (`log_context`). Records made outside
any request carry "-". Apart from the HTTP layer so that the engine can use it without importing the server.
"""

from __future__ import annotations

import contextvars
import logging
from contextlib import contextmanager

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


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
