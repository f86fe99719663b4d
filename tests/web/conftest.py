"""The browser the web page tests drive (Debian's Chromium through Playwright) and a
chatmeter server per test on a fresh SQLite copy."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Page, ViewportSize, async_playwright

from chatmeter.config import ModelConfig
from tests.conftest import make_settings
from tests.support.server import RunningServer, serve
from tests.web.pages import CHROMIUM, DESKTOP, LAUNCH_ARGS, PageErrors, ServerFactory


@pytest.fixture(scope="module")
def chromium() -> Path:
    if not CHROMIUM.exists():
        pytest.fail(
            f"Chromium is not installed at {CHROMIUM}: the web page tests need it. "
            "Install it with `apt-get install chromium` (`make test-deps` does).",
            pytrace=False,
        )
    return CHROMIUM


@pytest.fixture(scope="module")
async def browser(chromium: Path) -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=str(chromium), args=LAUNCH_ARGS)
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
def chatmeter(sqlite_url: str) -> ServerFactory:
    """`async with chatmeter(model_config) as server`: a server whose chats use that model."""

    def start(model: ModelConfig, **overrides: Any) -> AbstractAsyncContextManager[RunningServer]:
        settings = make_settings(
            sqlite_url, default_model="main", models={"main": model}, **overrides
        )
        return serve(settings)

    return start


@pytest.fixture
async def open_page(browser: Browser) -> AsyncIterator[Callable[..., Any]]:
    """Opens pages in fresh browser contexts; fails the test on any uncaught script error."""
    contexts = []
    errors = PageErrors()

    async def open_(url: str, viewport: ViewportSize = DESKTOP, **options: Any) -> Page:
        context = await browser.new_context(viewport=viewport, locale="en-US", **options)
        contexts.append(context)
        page = await context.new_page()
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        await page.goto(url)
        return page

    yield open_
    for context in contexts:
        await context.close()
    assert not errors, f"script errors on the page: {errors}"
