"""Serves the web pages shipped inside the package: the chat page at `/`, the admin
console at `/admin`, and their files at `/static/NAME` (the vendored libraries at
`/static/vendor/NAME`). No build step; the files are read as they are."""

from __future__ import annotations

import re
from importlib import resources
from importlib.resources.abc import Traversable

from fastapi import APIRouter
from starlette.responses import Response

from chatmeter.errors import ApiError

router = APIRouter(include_in_schema=False)

MEDIA_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}

# a file name, or one folder and a file name: no `..`, no hidden files
ASSET_PATH = re.compile(r"^(?:[a-z]+/)?[A-Za-z0-9][A-Za-z0-9_.-]*$")

# The pages load only their own files and talk only to this server; model output that
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


def _static() -> Traversable:
    return resources.files("chatmeter.web").joinpath("static")


def _page(name: str) -> Response:
    body = _static().joinpath(name).read_bytes()
    return Response(body, media_type="text/html", headers=PAGE_HEADERS)


@router.head("/")  # an uptime check of the page
@router.get("/")
async def index() -> Response:
    return _page("index.html")


@router.get("/admin")
async def admin() -> Response:
    """The admin console; it shows admin data only to a token the API accepts as admin."""
    return _page("admin.html")


@router.get("/static/{name:path}")
async def asset(name: str) -> Response:
    media_type = MEDIA_TYPES.get(name[name.rfind(".") :]) if "." in name else None
    file = _static().joinpath(*name.split("/")) if ASSET_PATH.match(name) else None
    if media_type is None or file is None or not file.is_file():
        raise ApiError(404, "NOT_FOUND", f"no such file: {name}")
    headers = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
    return Response(file.read_bytes(), media_type=media_type, headers=headers)
