"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

Route code raises APIError; the handlers here turn it, pydantic's validation
errors and anything unexpected into that shape with the right status.
"""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("longserve.errors")

# JSON nested past Python's recursion limit (json.loads raises RecursionError at about 1,000 levels): a client's
# mistake, never a 500
TOO_DEEP = "JSON nested deeper than about 1,000 levels is not accepted; flatten it"

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_server_error",
    503: "service_unavailable",
}


UNION_BRANCH = re.compile(r"^(str|int|float|bool|list\[.*\]|dict\[.*\]|.*\(.*\))$")


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, headers=None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"), "param": param, "code": code}}


def error_response(status: int, message: str, param=None, code=None, headers=None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def describe_validation_error(exc: RequestValidationError) -> tuple[str, str | None]:
    """One readable sentence for the first problem pydantic found, and the field it names."""
    first = exc.errors()[0]
    # pydantic names the union branch it tried ("prompt.list[int].0"); users need the field.
    location = [str(part) for part in first.get("loc", ()) if part != "body" and not UNION_BRANCH.match(str(part))]
    param = ".".join(location) or None
    message = first.get("msg", "invalid request")
    message = message.removeprefix("Value error, ")
    if first.get("type") == "invalid_unicode":  # valid_text.py: found before any field was read
        return message, first["ctx"]["path"]
    if first.get("type") == "extra_forbidden":
        message = f"unknown field {param!r}: remove it or check its spelling"
    elif first.get("type") == "json_invalid":
        message = "the request body is not valid JSON"
    elif param:
        message = f"{param}: {message}"
    return message, param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        message, param = describe_validation_error(exc)
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        elif message == "There was an error parsing the body":  # FastAPI's words for bytes json cannot decode
            message = "the request body is not valid JSON in UTF-8 (or it nests too deeply); send UTF-8 JSON"
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}")
