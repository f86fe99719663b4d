"""CORS for the API (SPEC section 2, `CHATMETER_CORS_ORIGINS`): a product's pages on
another origin may call `/api` and `/v1`, those origins only.

Bearer tokens, no cookies: no credentials mode, so a page cannot ride on a person's
session. It wraps the whole ASGI application, not FastAPI's middleware stack, because the
message route is served beside FastAPI (`app.py`)."""

from __future__ import annotations

from collections.abc import Sequence

from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

API_PREFIXES = ("/api/", "/v1/")
# any request header: the OpenAI SDKs send their own (`x-stainless-*`, `openai-*`), and
# with no credentials mode a header grants a page nothing it could not send anyway
ALLOWED_HEADERS = ("*",)
EXPOSED_HEADERS = ("Retry-After", "Content-Type")


def _is_api(path: str) -> bool:
    return path.startswith(API_PREFIXES) or path in ("/api", "/v1")


class ApiCors:
    def __init__(self, app: ASGIApp, origins: Sequence[str]) -> None:
        self._app = app
        self._cors = CORSMiddleware(
            app,
            allow_origins=origins,
            allow_methods=("GET", "POST", "PUT", "PATCH", "DELETE"),
            allow_headers=ALLOWED_HEADERS,
            expose_headers=EXPOSED_HEADERS,
            allow_credentials=False,
            max_age=600,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and _is_api(scope["path"]):
            await self._cors(scope, receive, send)
        else:
            await self._app(scope, receive, send)
