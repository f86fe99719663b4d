"""Serves the single-page chat client shipped inside the package."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from starlette.responses import HTMLResponse, Response

router = APIRouter(include_in_schema=False)


@router.get("/")
async def index() -> Response:
    page = resources.files("chatmeter.web").joinpath("static/index.html").read_bytes()
    return HTMLResponse(page, headers={"Cache-Control": "no-cache"})
