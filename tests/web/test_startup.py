"""A message sent while the page is still starting keeps its reply on the page: the
start-up's late steps (the usage chart, a remembered chat) must not replace it.

On a busy machine the usage summary is the last thing sign-in waits for, and the message
box already works: the page used to open the chat remembered in the tab once it came,
which by then was the chat just started, and its copy from the server, without the reply
still streaming, took the reply off the page. Here the late request is held until the
reply streams, so the race happens every time."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from playwright.async_api import Page, Route, expect

from tests.conftest import scripted, token_for
from tests.web.pages import ServerFactory, api, assistant_replies, chat_id_of, reply_text

WORDS = 60
REPLY = " ".join(f"word{n}" for n in range(1, WORDS + 1))


class Held:
    """Holds the requests a route matches until `release`; `arrived` once one came."""

    def __init__(self) -> None:
        self.arrived = asyncio.Event()
        self._released = asyncio.Event()

    async def handle(self, route: Route) -> None:
        self.arrived.set()
        await self._released.wait()
        await route.continue_()

    def release(self) -> None:
        self._released.set()


@pytest.mark.parametrize("late", ["usage summary", "remembered chat"])
async def test_a_message_sent_before_the_page_finished_starting_keeps_its_reply(
    late: str, chatmeter: ServerFactory, open_page: Callable[..., Any]
) -> None:
    async with chatmeter(scripted(reply=REPLY, chunks=WORDS, delay_ms=60)) as server:
        old = (await api(server, "POST", "/api/chat", "rosa", json={})).json()["chat_id"]
        page: Page = await open_page(f"{server.url}/")  # no token yet: the sign-in form
        held = Held()
        if late == "usage summary":
            await page.route("**/api/usage/summary*", held.handle)
            address = f"{server.url}/#token={token_for('rosa')}"
        else:
            await page.route(f"**/api/chat/{old}", held.handle)
            address = f"{server.url}/#token={token_for('rosa')}&chat={old}"
        await page.goto(address)
        await asyncio.wait_for(held.arrived.wait(), 30)

        message = page.get_by_role("textbox", name="Message")
        await message.fill("Count to sixty")
        await message.press("Enter")
        await expect(reply_text(page)).to_contain_text("word3")
        held.release()  # the start-up's late step ends while the reply streams

        await expect(reply_text(page)).to_have_text(REPLY)
        await expect(page.get_by_role("button", name="Send")).to_be_visible()
        await expect(page.locator("#chat-title")).to_have_text("Count to sixty")
        await expect(assistant_replies(page)).to_have_count(1)
        await expect(page.locator("#messages .msg.user")).to_have_count(1)
        await expect(page.locator("#messages .msg.user")).to_contain_text("Count to sixty")
        await expect(page.get_by_role("alert")).to_be_hidden()
        started = chat_id_of(page)
        assert started != old
        chat = (await api(server, "GET", f"/api/chat/{started}", "rosa")).json()
        assert [m["content"] for m in chat["messages"]] == ["Count to sixty", REPLY]
