"""CORS for the API (SPEC section 2, `CHATMETER_CORS_ORIGINS`): a product's pages on
another origin may call `/api` and `/v1`, those origins only.

Bearer tokens, no cookies: no credentials mode, so a page cannot ride on a person's
session. It wraps the whole ASGI application, not FastAPI's middleware stack, because the
message route is served beside FastAPI (`app.py`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from chatmeter.errors import ApiError
from chatmeter.v1.errors import from_api_error

API_PREFIXES = ("/api/", "/v1/")
# any request header: the OpenAI SDKs send their own (`x-stainless-*`, `openai-*`), and
# with no credentials mode a header grants a page nothing it could not send anyway
ALLOWED_HEADERS = ("*",)
EXPOSED_HEADERS = ("Retry-After", "Content-Type")


def _is_api(path: str) -> bool:
    return path.startswith(API_PREFIXES) or path in ("/api", "/v1")


def _is_v1(path: str) -> bool:
    return path.startswith("/v1/") or path == "/v1"


class _Cors(CORSMiddleware):
    """Starlette's CORS with a refused preflight answered in the error shape of the API
    asked (`openai_shape`: `/v1`'s), not Starlette's plain text: every non-2xx answer
    is JSON of the contract's shape."""

    def __init__(self, app: ASGIApp, *, openai_shape: bool, **options: Any) -> None:
        super().__init__(app, **options)
        self._openai_shape = openai_shape

    def preflight_response(self, request_headers: Headers) -> Response:
        answer = super().preflight_response(request_headers)
        if answer.status_code < 400:
            return answer
        reason = bytes(answer.body).decode()  # "Disallowed CORS origin, method"
        error = ApiError(answer.status_code, "CORS_REFUSED", f"{reason}.")
        refused = from_api_error(error).response() if self._openai_shape else error.response()
        for name, value in answer.headers.items():
            if name.startswith("access-control-") or name == "vary":
                refused.headers[name] = value
        return refused


class ApiCors:
    def __init__(self, app: ASGIApp, origins: Sequence[str]) -> None:
        self._app = app
        self._api, self._v1 = (
            _Cors(
                app,
                openai_shape=openai_shape,
                allow_origins=origins,
                allow_methods=("GET", "POST", "PUT", "PATCH", "DELETE"),
                allow_headers=ALLOWED_HEADERS,
                expose_headers=EXPOSED_HEADERS,
                allow_credentials=False,
                max_age=600,
            )
            for openai_shape in (False, True)
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and _is_api(scope["path"]):
            cors = self._v1 if _is_v1(scope["path"]) else self._api
            await cors(scope, receive, send)
        else:
            await self._app(scope, receive, send)
