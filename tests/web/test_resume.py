"""A reply keeps coming on the page when the page is reloaded mid-reply or the network
drops under it (SPEC 11), and is shown once, without duplicated text."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
from playwright.async_api import Page, Route, expect

from tests.conftest import scripted, token_for
from tests.support.proxy import cutting_proxy
from tests.web.pages import ServerFactory, api, assistant_replies, chat_id_of, reply_text, shot

WORDS = 60
REPLY = " ".join(f"word{n}" for n in range(1, WORDS + 1))


async def test_a_reload_mid_reply_ends_with_the_full_reply_once(
    chatmeter: ServerFactory, open_page: Callable[..., Any]
) -> None:
    async with chatmeter(scripted(reply=REPLY, chunks=WORDS, delay_ms=100)) as server:
        page: Page = await open_page(f"{server.url}/#token={token_for('pia')}")
        message = page.get_by_role("textbox", name="Message")
        await message.fill("Count to sixty")
        await message.press("Enter")
        await expect(reply_text(page)).to_contain_text("word3")
        chat_id = chat_id_of(page)

        await page.reload()
        # the reply goes on where it is, from its first word, once
        await expect(page.get_by_role("button", name="Stop")).to_be_visible()
        await expect(assistant_replies(page)).to_have_count(1)
        await expect(reply_text(page)).to_contain_text("word1 word2 word3")
        await expect(reply_text(page)).to_have_text(REPLY)
        await expect(page.get_by_role("button", name="Send")).to_be_visible()
        assert await reply_text(page).text_content() == REPLY
        await expect(page.locator("#chat-title")).to_have_text("Count to sixty")
        await expect(assistant_replies(page)).to_have_count(1)
        await expect(page.locator("#messages .msg.user")).to_have_count(1)

        saved = (await api(server, "GET", f"/api/chat/{chat_id}", "pia")).json()
        reply = saved["messages"][-1]
        assert (reply["role"], reply["status"], reply["content"]) == (
            "assistant",
            "complete",
            REPLY,
        )
        await expect(assistant_replies(page).last.locator(".msg-tokens")).to_have_text(
            f"{reply['tokens_consumed']} tokens"
        )
        # a reload after the end shows the saved reply, and nothing is resumed twice
        await page.reload()
        await expect(reply_text(page)).to_have_text(REPLY)
        await expect(assistant_replies(page)).to_have_count(1)


async def test_a_reply_survives_the_network_dropping_mid_reply(
    chatmeter: ServerFactory, open_page: Callable[..., Any]
) -> None:
    async with (
        chatmeter(scripted(reply=REPLY, chunks=WORDS, delay_ms=60)) as server,
        cutting_proxy(server.url, events=8, request_marker=b"/message HTTP/1.1") as proxy,
    ):
        page: Page = await open_page(f"{proxy.url}/#token={token_for('quin')}")
        message = page.get_by_role("textbox", name="Message")
        await message.fill("Count again")
        await message.press("Enter")
        await expect(reply_text(page)).to_have_text(REPLY)
        assert proxy.cuts == 1  # the connection was cut mid-reply, and the page went on
        assert await reply_text(page).text_content() == REPLY
        await expect(assistant_replies(page)).to_have_count(1)
        await expect(assistant_replies(page).last.locator(".badge")).to_have_count(0)
        await expect(page.get_by_role("alert")).to_be_hidden()
        chat = (await api(server, "GET", f"/api/chat/{chat_id_of(page)}", "quin")).json()
        assert [m["content"] for m in chat["messages"]] == ["Count again", REPLY]
        await shot(page, "desktop-resumed")


async def test_a_message_whose_answer_never_came_is_found_and_its_reply_followed(
    chatmeter: ServerFactory, open_page: Callable[..., Any]
) -> None:
    """The network fails after the message reached the server, before its answer came:
    the page looks at the chat before saying it was not sent. The message is there and
    its reply streams, so the page follows it (not the text back in the box, and a
    second send refused as a reply in progress)."""
    async with chatmeter(scripted(reply=REPLY, chunks=WORDS, delay_ms=100)) as server:
        page: Page = await open_page(f"{server.url}/#token={token_for('ugo')}")

        async def answer_lost(route: Route) -> None:
            request = route.request
            headers = {
                name: value
                for name, value in (await request.all_headers()).items()
                if name in ("authorization", "content-type")
            }
            async with httpx.AsyncClient(timeout=30) as http:
                async with http.stream(
                    "POST", request.url, content=request.post_data_buffer, headers=headers
                ) as response:
                    assert response.status_code == 200  # opened: the reply goes on
            await route.abort("connectionreset")

        await page.route("**/api/chat/*/message", answer_lost, times=1)
        message = page.get_by_role("textbox", name="Message")
        await message.fill("Count to sixty")
        await message.press("Enter")
        await expect(page.get_by_role("button", name="Stop")).to_be_visible()
        await expect(reply_text(page)).to_have_text(REPLY)
        await expect(message).to_have_value("")
        await expect(page.locator("#messages .msg.user .msg-body")).to_have_text(["Count to sixty"])
        await expect(assistant_replies(page)).to_have_count(1)
        chat = (await api(server, "GET", f"/api/chat/{chat_id_of(page)}", "ugo")).json()
        assert [m["content"] for m in chat["messages"]] == ["Count to sixty", REPLY]


async def test_a_reply_cut_off_by_an_outage_longer_than_the_retries_shows_once_back_online(
    chatmeter: ServerFactory, open_page: Callable[..., Any]
) -> None:
    """The network is gone for longer than the page retries a resume: the reply shows as
    interrupted. When the browser is online again the page loads the chat, and the reply,
    which went on without it (SPEC 11), shows whole."""
    async with (
        chatmeter(scripted(reply=REPLY, chunks=WORDS, delay_ms=60)) as server,
        cutting_proxy(server.url, events=8, request_marker=b"/message HTTP/1.1") as proxy,
    ):
        page: Page = await open_page(f"{proxy.url}/#token={token_for('vic')}")
        outage = page.context
        message = page.get_by_role("textbox", name="Message")
        await message.fill("Count once more")
        await expect(page.get_by_role("button", name="Send")).to_be_enabled()
        # from the cut on, nothing reaches the server
        await page.route(
            "**/api/chat/*/stream**", lambda route: route.abort("internetdisconnected")
        )
        await page.route("**/api/chat/*", lambda route: route.abort("internetdisconnected"))
        await page.route("**/api/usage", lambda route: route.abort("internetdisconnected"))
        await message.press("Enter")
        await expect(assistant_replies(page).last.locator(".badge")).to_have_text("Interrupted")
        assert proxy.cuts == 1
        await page.unroute_all()
        await outage.set_offline(True)
        await outage.set_offline(False)
        await expect(reply_text(page)).to_have_text(REPLY)
        await expect(assistant_replies(page)).to_have_count(1)
        await expect(assistant_replies(page).last.locator(".badge")).to_have_count(0)
        await expect(page.get_by_role("button", name="Send")).to_be_enabled()
