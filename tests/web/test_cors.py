"""CORS (`CHATMETER_CORS_ORIGINS`): a page on another loopback origin, in a real
Chromium, may call `/api` and `/v1` and read a stream when its origin is listed, and
cannot when it is not. The page is served by a second tiny HTTP server: a real origin."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import Browser, Page, async_playwright

from chatmeter.config import ConfigError, load_settings
from tests.conftest import auth, make_settings, token_for
from tests.support.server import RunningServer, serve
from tests.web.pages import CHROMIUM, LAUNCH_ARGS

PAGE = b"<!doctype html><title>a product</title><p>a product's front end</p>"


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(f"Chromium is not installed at {CHROMIUM} (`make test-deps`)", pytrace=False)
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
        try:
            yield launched
        finally:
            await launched.close()


@asynccontextmanager
async def front_end() -> AsyncIterator[str]:
    """A second origin: an HTTP server on another loopback port that serves one page."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        head = b"HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: %d\r\n"
        writer.write(head % len(PAGE) + b"connection: close\r\n\r\n" + PAGE)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        await server.wait_closed()


@pytest.fixture
def sqlite_url(sqlite_template: Path, tmp_path: Path) -> Iterator[str]:
    path = tmp_path / "chatmeter.db"
    shutil.copyfile(sqlite_template, path)
    yield f"sqlite+aiosqlite:///{path}"


@asynccontextmanager
async def origins_and_server(sqlite_url: str) -> AsyncIterator[tuple[str, str, RunningServer]]:
    async with front_end() as allowed, front_end() as refused:
        settings = make_settings(sqlite_url, cors_origins=(allowed, "https://app.example"))
        async with serve(settings) as server:
            yield allowed, refused, server


FETCH_AND_STREAM = """
async ([base, token]) => {
  const headers = {"Authorization": "Bearer " + token, "Content-Type": "application/json"};
  try {
    const chats = await fetch(base + "/api/chat", {method: "POST", headers, body: "{}"});
    const chat = await chats.json();
    const reply = await fetch(base + "/api/chat/" + chat.chat_id + "/message",
      {method: "POST", headers, body: JSON.stringify({message: "hello"})});
    const reader = reply.body.getReader();
    const decoder = new TextDecoder();
    let text = "";
    for (;;) {
      const {done, value} = await reader.read();
      if (done) break;
      text += decoder.decode(value);
    }
    const completion = await fetch(base + "/v1/chat/completions", {method: "POST", headers,
      body: JSON.stringify({model: "scripted", stream: true,
                            messages: [{role: "user", content: "hi"}]})});
    const v1 = await completion.text();
    return {ok: true, status: reply.status, text, v1};
  } catch (error) {
    return {ok: false, error: String(error)};
  }
}
"""


async def page_at(browser: Browser, origin: str) -> Page:
    context = await browser.new_context()
    page = await context.new_page()
    await page.goto(origin + "/")
    return page


async def test_a_listed_origin_fetches_and_streams_another_does_not(
    browser: Browser, sqlite_url: str
) -> None:
    async with origins_and_server(sqlite_url) as (allowed, refused, server):
        page = await page_at(browser, allowed)
        result: dict[str, Any] = await page.evaluate(
            FETCH_AND_STREAM, [server.url, token_for("cora")]
        )
        assert result["ok"], result
        assert result["status"] == 200
        assert '"done":true' in result["text"]
        assert result["v1"].rstrip().endswith("data: [DONE]")
        other = await page_at(browser, refused)
        blocked: dict[str, Any] = await other.evaluate(
            FETCH_AND_STREAM, [server.url, token_for("dora")]
        )
        assert not blocked["ok"]
        assert "Failed to fetch" in blocked["error"]
        await page.context.close()
        await other.context.close()
        # the refused page's preflight stopped it before anything was made
        async with httpx.AsyncClient(base_url=server.url) as client:
            assert (await client.get("/api/chat", headers=auth("dora"))).json()["chats"] == []


async def test_preflight_and_headers(sqlite_url: str) -> None:
    async with origins_and_server(sqlite_url) as (allowed, refused, server):
        async with httpx.AsyncClient(base_url=server.url) as client:
            ask = {
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os",
            }
            for path in ("/api/chat/x/message", "/v1/chat/completions", "/api/keys"):
                ok = await client.options(path, headers={"Origin": allowed, **ask})
                assert ok.status_code == 200, path
                assert ok.headers["access-control-allow-origin"] == allowed
                assert "POST" in ok.headers["access-control-allow-methods"]
                assert "x-stainless-os" in ok.headers["access-control-allow-headers"]
                assert "access-control-allow-credentials" not in ok.headers
                no = await client.options(path, headers={"Origin": refused, **ask})
                assert "access-control-allow-origin" not in no.headers
            simple = await client.get("/api/chat", headers={"Origin": allowed, **auth("eve")})
            assert simple.headers["access-control-allow-origin"] == allowed
            assert "retry-after" in simple.headers["access-control-expose-headers"].lower()
            other = await client.get("/api/chat", headers={"Origin": refused, **auth("eve")})
            assert "access-control-allow-origin" not in other.headers
            # only the API: the page, health and metrics are not for other origins
            page = await client.get("/healthz", headers={"Origin": allowed})
            assert "access-control-allow-origin" not in page.headers


async def test_a_refused_preflight_is_answered_in_the_error_shape(sqlite_url: str) -> None:
    # Starlette answers it in plain text ("Disallowed CORS origin"): every non-2xx
    # answer is JSON, in `/v1`'s shape under /v1
    settings = make_settings(sqlite_url, cors_origins=["https://app.example"])
    ask = {"Access-Control-Request-Method": "POST"}
    async with serve(settings) as server, httpx.AsyncClient(base_url=server.url) as client:
        for origin, method in (("https://evil.example", "POST"), ("https://app.example", "TRACE")):
            headers = {"Origin": origin, "Access-Control-Request-Method": method}
            api = await client.options("/api/chat", headers=headers)
            assert api.status_code == 400, api.text
            assert api.headers["content-type"] == "application/json"
            body = api.json()
            assert (body["error"], body["code"]) == (True, "CORS_REFUSED")
            assert "Disallowed CORS" in body["message"]
            if origin == "https://evil.example":
                assert "access-control-allow-origin" not in api.headers
            v1 = await client.options("/v1/chat/completions", headers=headers)
            assert v1.status_code == 400, v1.text
            assert v1.json()["error"]["type"] == "invalid_request_error"
        allowed = await client.options(
            "/api/chat", headers={"Origin": "https://app.example", **ask}
        )
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == "https://app.example"


async def test_no_origins_by_default(server: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=server.url) as client:
        response = await client.get("/api/chat", headers={"Origin": server.url, **auth("fay")})
        preflight = await client.options(
            "/api/chat",
            headers={"Origin": "http://127.0.0.1:1", "Access-Control-Request-Method": "GET"},
        )
    assert response.status_code == 200
    assert "access-control-allow-origin" not in response.headers
    assert "access-control-allow-origin" not in preflight.headers


def test_origins_come_from_a_comma_separated_variable() -> None:
    env = {"CHATMETER_CORS_ORIGINS": "http://127.0.0.1:3000/, https://app.example ,"}
    assert load_settings(env).cors_origins == ("http://127.0.0.1:3000", "https://app.example")
    assert load_settings({}).cors_origins == ()
    with pytest.raises(ConfigError, match="CHATMETER_CORS_ORIGINS"):
        load_settings({"CHATMETER_CORS_ORIGINS": "https://app.example/path"})


async def test_an_origin_is_matched_as_browsers_write_it(sqlite_url: str) -> None:
    # a browser's Origin has its scheme and host in lower case and no default port: an
    # origin configured as "https://App.Example:443" was accepted and never matched
    env = {"CHATMETER_CORS_ORIGINS": "https://App.Example:443,HTTP://127.0.0.1:80,http://[::1]:80"}
    assert load_settings(env).cors_origins == (
        "https://app.example",
        "http://127.0.0.1",
        "http://[::1]",
    )
    kept = "http://app.example:8080,https://app.example:80,http://[::80]"
    assert load_settings({"CHATMETER_CORS_ORIGINS": kept}).cors_origins == tuple(kept.split(","))
    settings = make_settings(sqlite_url, cors_origins=["https://App.Example:443"])
    ask = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    async with serve(settings) as server, httpx.AsyncClient(base_url=server.url) as client:
        preflight = await client.options("/v1/chat/completions", headers=ask)
        assert preflight.status_code == 200, preflight.text
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"
