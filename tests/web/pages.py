"""What the web page tests share: the browser's settings, a screenshot, API calls beside
the page, and where the page shows things."""

from __future__ import annotations

import re
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import httpx
from playwright.async_api import Page, ViewportSize, expect

from tests.conftest import auth
from tests.support.server import RunningServer

CHROMIUM = Path("/usr/bin/chromium")
LAUNCH_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
DESKTOP: ViewportSize = {"width": 1280, "height": 800}
PHONE: ViewportSize = {"width": 375, "height": 740}

# generous: CI machines are busy, and a wait ends as soon as its condition holds
expect.set_options(timeout=30_000)

ServerFactory = Callable[..., AbstractAsyncContextManager[RunningServer]]


class PageErrors(list[str]):
    pass


async def shot(page: Page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    await page.screenshot(path=str(path))
    return path


async def api(
    server: RunningServer, method: str, path: str, user: str, *, admin: bool = False, **kwargs: Any
) -> httpx.Response:
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        response = await http.request(method, path, headers=auth(user, admin=admin), **kwargs)
    return response


def chat_id_of(page: Page) -> str:
    match = re.search(r"#chat=([0-9a-f-]{36})", page.url)
    assert match, f"the selected chat is not in the address: {page.url}"
    return match.group(1)


def assistant_replies(page: Page) -> Any:
    return page.locator("#messages .msg.assistant")


def reply_text(page: Page) -> Any:
    return assistant_replies(page).last.locator(".msg-body")
