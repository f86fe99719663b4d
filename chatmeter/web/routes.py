"""Serves the single-page chat client shipped inside the package: the page at `/` and
its few files at `/static/NAME`. No build step; the files are read as they are."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from starlette.responses import Response

from chatmeter.errors import ApiError

router = APIRouter(include_in_schema=False)

ASSETS = {
    "app.js": "text/javascript; charset=utf-8",
    "api.js": "text/javascript; charset=utf-8",
    "sse.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}

# The page loads only its own files and talks only to this server; model output that
# slipped into the DOM as HTML could still not run a script or fetch anything.
PAGE_HEADERS = {
    "Cache-Control": "no-cache",
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}


def _read(name: str) -> bytes:
    return resources.files("chatmeter.web").joinpath("static", name).read_bytes()


@router.get("/")
async def index() -> Response:
    return Response(_read("index.html"), media_type="text/html", headers=PAGE_HEADERS)


@router.get("/static/{name}")
async def asset(name: str) -> Response:
    media_type = ASSETS.get(name)
    if media_type is None:
        raise ApiError(404, "NOT_FOUND", f"no such file: {name}")
    headers = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
    return Response(_read(name), media_type=media_type, headers=headers)
