"""One error shape for every non-2xx answer and every stream error event:
`{"error": true, "code": "UPPER_SNAKE_CASE", "message": "for a person"}`."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Mapping
from typing import Any

import asyncpg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from chatmeter.jsonutil import json_response

log = logging.getLogger("chatmeter")


class ApiError(Exception):
    """An answer for the client: raised anywhere before a stream starts. `extra` adds
    fields to the error body (`resets_at`), `headers` to the answer (`Retry-After`)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        extra: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.status = status
        self.code = code
        self.message = message
        self.extra = dict(extra or {})
        self.headers = dict(headers or {})
        # every argument, as exceptions keep them: a copy is made from `args`
        super().__init__(status, code, message, self.extra, self.headers)

    def __str__(self) -> str:
        return self.message

    def response(self) -> Response:
        return error_response(self.status, self.code, self.message, self.headers, **self.extra)


def error_body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": True, "code": code, "message": message, **extra}


def error_response(
    status: int,
    code: str,
    message: str,
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> Response:
    response = json_response(error_body(code, message, **extra), status)
    if headers:
        response.headers.update(headers)
    return response


# what a database that is away raises through the transactor's drivers (sqlite3 past its
# busy timeout, asyncpg losing its connection, the SQLite writer process gone), or one
# that cannot serve now: PostgreSQL's insufficient resources (class 53: too many
# connections, disk full, out of memory) and operator intervention (class 57: starting
# up or shutting down, a statement timeout or a cancel); or a transaction that lost a
# race (class 40: a deadlock, a serialization failure) more often than the transactor
# runs it again: rolled back, nothing changed, worth trying again
DATABASE_UNAVAILABLE: tuple[type[Exception], ...] = (
    sqlite3.OperationalError,
    asyncpg.PostgresConnectionError,
    asyncpg.InsufficientResourcesError,
    asyncpg.OperatorInterventionError,
    asyncpg.TransactionRollbackError,
    ConnectionError,
    TimeoutError,
)


def database_down_response(exc: Exception) -> Response:
    """The database is away (restarting, unreachable, locked past the busy timeout):
    nothing was changed, and the client may retry; a 503 says so where a 500 would not."""
    log.warning("database unavailable: %s", type(exc).__name__)
    return error_response(
        503,
        "DATABASE_ERROR",
        "The database cannot be reached. Try again shortly.",
        {"Retry-After": "1"},
    )


def unexpected_error_response(exc: Exception) -> Response:
    """A bug: logged with its traceback, answered in the error shape."""
    log.error("unexpected error", exc_info=exc)
    return error_response(500, "INTERNAL_ERROR", "Something went wrong on our side.")


_HTTP_CODES = {
    400: "INVALID_REQUEST",
    401: "UNAUTHORIZED",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    413: "PAYLOAD_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
}


def install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return exc.response()

    async def on_validation(_: Request, exc: Exception) -> Response:
        # FastAPI would answer 422; the contract says 400 for every bad request
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query"))
        message = f"{where}: {first.get('msg', 'invalid')}" if where else "invalid request"
        return error_response(400, "INVALID_REQUEST", message)

    async def on_http(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        code = _HTTP_CODES.get(exc.status_code, "HTTP_ERROR")
        status = 400 if exc.status_code == 422 else exc.status_code
        # keep the exception's headers: a 405 must say what is allowed (`Allow`)
        return error_response(status, code, str(exc.detail), exc.headers)

    async def on_client_left(_: Request, exc: Exception) -> Response:
        # left (or was cut off for being too slow) before the body was all there: not a
        # bug; the answer goes nowhere, but answering keeps it out of the error log
        return error_response(400, "INVALID_REQUEST", "The request body did not arrive.")

    async def on_database_down(_: Request, exc: Exception) -> Response:
        return database_down_response(exc)

    async def on_unexpected(_: Request, exc: Exception) -> Response:
        return unexpected_error_response(exc)

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(ClientDisconnect, on_client_left)
    for unavailable in DATABASE_UNAVAILABLE:
        app.add_exception_handler(unavailable, on_database_down)
    app.add_exception_handler(Exception, on_unexpected)
