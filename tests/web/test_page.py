"""The web chat page, driven in a real Chromium the way a person uses it, against a real
chatmeter server with scripted models."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncGenerator, Callable
from typing import Any

import httpx
from playwright.async_api import Page, expect

from chatmeter.providers.base import GenerationRequest, ProviderError, StreamOutcome
from tests.conftest import scripted, token_for
from tests.support.server import RunningServer
from tests.support.sse import stream_message
from tests.support.waiting import eventually
from tests.web.pages import (
    PHONE,
    ServerFactory,
    api,
    assistant_replies,
    chat_id_of,
    reply_text,
    shot,
)

STORY = (
    "Once upon a time, a careful meter counted every token the model spoke, "
    "and not one was ever lost."
)
# slow enough that a stop lands long before the end however busy the machine: a reply
# takes 40 s (400 pieces, 100 ms apart); the tests stop it
SLOW_WORDS = 400
SLOW = " ".join(f"word{n}" for n in range(1, SLOW_WORDS + 1))
PAYLOAD = '<script>window.__pwned=1</script> <img src=x onerror="window.__pwned=1"> stays text.'


async def reply_started(server: RunningServer, chat_id: str, user: str) -> None:
    """The reply to "From another window" streams: its opening saved that message."""

    async def started() -> bool:
        chat = (await api(server, "GET", f"/api/chat/{chat_id}", user)).json()
        return any(m["content"] == "From another window" for m in chat["messages"])

    await eventually(started, within=30)


async def test_a_person_signs_in_chats_and_watches_the_reply_stream(
    chatmeter: ServerFactory, open_page: Callable[..., Any]
) -> None:
    model = scripted(reply=STORY, chunks=20, delay_ms=60)
    async with chatmeter(model) as server:
        page: Page = await open_page(f"{server.url}/#token={token_for('alice')}")
        await expect(page.locator("#who")).to_have_text("alice")
        assert "token=" not in page.url  # taken out of the address bar
        await page.get_by_role("button", name="New chat", exact=True).click()

        message = page.get_by_role("textbox", name="Message")
        await message.fill("Tell me a story")
        await page.get_by_role("button", name="Send").click()

        await expect(page.locator("#messages .msg.user .msg-body")).to_have_text(
            ["Tell me a story"]
        )
        await expect(reply_text(page)).to_contain_text("Once upon")
        partial = await reply_text(page).text_content()
        assert partial and STORY.startswith(partial) and len(partial) < len(STORY), partial
        await expect(page.get_by_role("button", name="Stop")).to_be_visible()
        await expect(page.get_by_role("button", name="Send")).to_be_hidden()
        await shot(page, "desktop-streaming")

        await expect(reply_text(page)).to_have_text(STORY)
        await expect(page.get_by_role("button", name="Send")).to_be_enabled()
        await expect(page.get_by_role("button", name="Stop")).to_be_hidden()

        usage = (await api(server, "GET", "/api/usage", "alice")).json()
        used, left = usage["total_tokens_used"], usage["tokens_remaining"]
        assert used > 0 and left == 100_000 - used
        await expect(page.get_by_role("status")).to_have_text(
            f"This reply used {used} tokens · {left:,} tokens left."
        )
        await expect(assistant_replies(page).last.locator(".msg-tokens")).to_have_text(
            f"{used} tokens"
        )
        budget = page.get_by_role("progressbar", name=re.compile("Token budget"))
        await expect(budget).to_have_accessible_name(
            f"Token budget {left:,} of 100,000 tokens left"
        )
        assert await budget.evaluate("bar => [bar.value, bar.max]") == [used, 100_000]

        # the new chat is listed, titled after its first message, and selected
        chats = page.get_by_role("navigation", name="Chats")
        listed = chats.get_by_role("button", name=re.compile("Tell me a story"))
        await expect(listed).to_have_attribute("aria-current", "page")
        chat_id = chat_id_of(page)

        # Enter sends; Shift+Enter is a new line
        await message.press_sequentially("First line")
        await message.press("Shift+Enter")
        await message.press_sequentially("second line")
        assert await message.input_value() == "First line\nsecond line"
        await message.press("Enter")
        await expect(page.locator("#messages .msg.user")).to_have_count(2)
        assert (
            await page.locator("#messages .msg.user .msg-body").last.text_content()
            == "First line\nsecond line"
        )
        await expect(assistant_replies(page)).to_have_count(2)
        await expect(reply_text(page)).to_have_text(STORY)
        await expect(message).to_have_value("")
        await shot(page, "desktop-conversation")

        # after a reload: still signed in, the same chat open, its history shown
        await page.reload()
        await expect(page.locator("#chat-title")).to_have_text("Tell me a story")
        assert chat_id_of(page) == chat_id
        bodies = page.locator("#messages .msg .msg-body")
        await expect(bodies).to_have_count(4)
        texts = await bodies.all_text_contents()
        assert texts == ["Tell me a story", STORY, "First line\nsecond line", STORY]
        saved = (await api(server, "GET", f"/api/chat/{chat_id}", "alice")).json()
        assert [m["content"] for m in saved["messages"]] == texts
        tokens = [m["tokens_consumed"] for m in saved["messages"] if m["role"] == "assistant"]
        await expect(page.locator("#messages .msg-tokens")).to_have_text(
            [f"{n} tokens" for n in tokens]
        )
        await shot(page, "desktop-reloaded")


async def test_stop_ends_a_slow_reply_and_the_page_stays_usable(
    chatmeter: ServerFactory, open_page: Callable[..., Any]
) -> None:
    # idle pings (`: ping` comments) arrive between the pieces: the page skips them
    slow = scripted(reply=SLOW, chunks=SLOW_WORDS, delay_ms=100)
    async with chatmeter(slow, ping_interval_seconds=0.03) as server:
        page: Page = await open_page(f"{server.url}/#token={token_for('bob')}")
        message = page.get_by_role("textbox", name="Message")
        await message.fill("Count slowly")
        await message.press("Enter")
        await expect(reply_text(page)).to_contain_text("word2")
        await page.get_by_role("button", name="Stop").click()

        await expect(assistant_replies(page).last.locator(".badge")).to_have_text("Stopped")
        await expect(page.get_by_role("status")).to_contain_text("Stopped.")
        await expect(page.get_by_role("button", name="Send")).to_be_enabled()
        await expect(page.get_by_role("button", name="Stop")).to_be_hidden()
        shown = await reply_text(page).text_content()
        assert shown and SLOW.startswith(shown) and len(shown) < len(SLOW), shown

        chat = (await api(server, "GET", f"/api/chat/{chat_id_of(page)}", "bob")).json()
        reply = chat["messages"][-1]
        assert (reply["role"], reply["status"], reply["content"]) == ("assistant", "stopped", shown)
        await shot(page, "desktop-stopped")

        # the message box works again: a second message streams and can be stopped too
        await message.fill("Again")
        await page.get_by_role("button", name="Send").click()
        await expect(assistant_replies(page)).to_have_count(2)
        await expect(reply_text(page)).to_contain_text("word1")
        await page.get_by_role("button", name="Stop").click()
        await expect(page.locator("#messages .badge")).to_have_text(["Stopped", "Stopped"])
        await expect(message).to_be_editable()


async def test_a_spent_budget_is_explained_in_words(
    chatmeter: ServerFactory, open_page: Callable[..., Any]
) -> None:
    async with chatmeter(scripted(reply="Short answer.", chunks=2)) as server:
        page: Page = await open_page(f"{server.url}/#token={token_for('carol')}")
        message = page.get_by_role("textbox", name="Message")
        await message.fill("Hello")
        await message.press("Enter")
        await expect(reply_text(page)).to_have_text("Short answer.")
        used = (await api(server, "GET", "/api/usage", "carol")).json()["total_tokens_used"]
        limited = await api(
            server,
            "PUT",
            "/api/admin/users/carol/limit",
            "root",
            admin=True,
            json={"token_limit": used},
        )
        assert limited.status_code == 200, limited.text

        await message.fill("One more question")
        await page.get_by_role("button", name="Send").click()
        notice = page.get_by_role("alert")
        await expect(notice).to_contain_text("Your token budget is spent")
        text = await notice.inner_text()
        assert "TOKEN_BUDGET_EXCEEDED" not in text and "{" not in text
        # nothing was sent: the text is back in the box, the page is usable
        await expect(message).to_have_value("One more question")
        await expect(page.get_by_role("button", name="Send")).to_be_enabled()
        await expect(page.locator("#messages .msg.user")).to_have_count(1)
        await expect(page.locator("#budget-text")).to_have_text(f"0 of {used:,} tokens left")
        await shot(page, "desktop-budget-spent")


class FailingProvider:
    """A model that says a little and then fails as a busy provider does (429)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.counts_locally = False

    async def stream(
        self, request: GenerationRequest, outcome: StreamOutcome
    ) -> AsyncGenerator[str, None]:
        yield "I was about to say"
        await asyncio.sleep(0.05)
        raise ProviderError("PROVIDER_RATE_LIMITED", "429 Too Many Requests")

    async def count_tokens(self, texts: list[str]) -> list[int]:
        return [len(text) // 4 + 1 for text in texts]

    async def aclose(self) -> None:
        return None


async def test_a_model_failure_mid_reply_is_explained(
    chatmeter: ServerFactory, open_page: Callable[..., Any]
) -> None:
    async with chatmeter(scripted()) as server:
        server.services.providers.add(FailingProvider("main"))
        page: Page = await open_page(f"{server.url}/#token={token_for('fay')}")
        message = page.get_by_role("textbox", name="Message")
        await message.fill("Are you there?")
        await message.press("Enter")
        await expect(page.get_by_role("alert")).to_contain_text(
            "The model is busy right now. Try again in a moment."
        )
        await expect(reply_text(page)).to_have_text("I was about to say")
        await expect(assistant_replies(page).last.locator(".badge")).to_have_text("Failed")
        await expect(page.get_by_role("button", name="Send")).to_be_enabled()
        await expect(message).to_be_editable()
        await page.get_by_role("button", name="Dismiss").click()
        await expect(page.get_by_role("alert")).to_be_hidden()


async def test_a_reply_already_in_progress_is_explained(
    chatmeter: ServerFactory, open_page: Callable[..., Any]
) -> None:
    async with chatmeter(scripted(reply=SLOW, chunks=SLOW_WORDS, delay_ms=100)) as server:
        created = await api(server, "POST", "/api/chat", "gus", json={"title": "Busy chat"})
        chat_id = created.json()["chat_id"]
        page: Page = await open_page(f"{server.url}/#token={token_for('gus')}")
        await page.get_by_role("button", name="Busy chat").click()
        await expect(page.locator("#chat-title")).to_have_text("Busy chat")

        async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
            # another window streams a reply in the same chat
            elsewhere = asyncio.create_task(
                stream_message(http, chat_id, "From another window", token_for("gus"))
            )
            await reply_started(server, chat_id, "gus")
            message = page.get_by_role("textbox", name="Message")
            await message.fill("Me too")
            await message.press("Enter")
            await expect(page.get_by_role("alert")).to_contain_text(
                "A reply is still being written in this chat"
            )
            await expect(message).to_have_value("Me too")
            # the page then follows that reply, so the Stop the words offer is there
            await expect(page.locator("#messages .msg.user .msg-body")).to_have_text(
                ["From another window"]
            )
            await expect(reply_text(page)).not_to_be_empty()
            await page.get_by_role("button", name="Stop").click()
            result = await elsewhere
            await expect(assistant_replies(page).last.locator(".badge")).to_have_text("Stopped")
            await expect(page.get_by_role("button", name="Send")).to_be_enabled()
            await expect(message).to_have_value("Me too")
        assert result.last["finish_reason"] == "stopped"


async def test_model_output_is_shown_as_text_never_run(
    chatmeter: ServerFactory, open_page: Callable[..., Any]
) -> None:
    async with chatmeter(scripted(reply=PAYLOAD, chunks=9, delay_ms=10)) as server:
        page: Page = await open_page(f"{server.url}/#token={token_for('hank')}")
        message = page.get_by_role("textbox", name="Message")
        await message.fill(PAYLOAD)
        await message.press("Enter")
        await expect(reply_text(page)).to_have_text(PAYLOAD)

        async def check_inert() -> None:
            # the chat is titled after its first message once the reply is saved
            await expect(page.locator("#chat-title")).to_contain_text("<script>")
            await expect(page.locator(".chat-item-title")).to_contain_text(
                ["<script>window.__pwned=1</script> <img src=x"]
            )
            assert await page.evaluate("typeof window.__pwned") == "undefined"
            assert await page.locator("#messages img, #messages script").count() == 0
            assert await page.locator("#chat-list img, #chat-list script").count() == 0
            bodies = await page.locator("#messages .msg-body").all_text_contents()
            assert bodies == [PAYLOAD, PAYLOAD]
            title = await page.locator("#chat-title").text_content()
            assert title and title.startswith("<script>window.__pwned=1</script>")

        await check_inert()
        await page.reload()  # the history path renders the saved text
        await expect(page.locator("#messages .msg-body")).to_have_count(2)
        await check_inert()
        await shot(page, "desktop-html-as-text")


async def test_phone_width_shows_the_chat_and_the_message_box(
    chatmeter: ServerFactory, open_page: Callable[..., Any]
) -> None:
    async with chatmeter(scripted(reply=STORY, chunks=4)) as server:
        page: Page = await open_page(
            f"{server.url}/#token={token_for('ida')}",
            viewport=PHONE,
            is_mobile=True,
            has_touch=True,
        )
        message = page.get_by_role("textbox", name="Message")
        send = page.get_by_role("button", name="Send")
        await expect(message).to_be_visible()
        await expect(send).to_be_visible()
        await message.fill("Hello from my phone")
        await send.tap()
        await expect(reply_text(page)).to_have_text(STORY)
        for locator in (message, send, page.get_by_role("button", name="Sign out")):
            box = await locator.bounding_box()
            assert box is not None
            assert 0 <= box["x"] and box["x"] + box["width"] <= PHONE["width"], box
            assert 0 <= box["y"] and box["y"] + box["height"] <= PHONE["height"], box
        overflow = await page.evaluate(
            "document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert overflow <= 0, f"the page scrolls sideways by {overflow}px"
        # the chat list sits above the conversation
        nav = await page.get_by_role("navigation", name="Chats").bounding_box()
        conversation = await page.locator("#messages").bounding_box()
        assert nav and conversation and nav["y"] + nav["height"] <= conversation["y"]
        await shot(page, "phone-conversation")


async def test_sign_in_with_a_pasted_token_sign_out_and_an_expired_token(
    chatmeter: ServerFactory, open_page: Callable[..., Any]
) -> None:
    async with chatmeter(scripted()) as server:
        page: Page = await open_page(f"{server.url}/")
        token_box = page.get_by_label("Access token")
        await expect(token_box).to_be_visible()
        await expect(page.get_by_role("textbox", name="Message")).to_be_hidden()
        await shot(page, "desktop-sign-in")

        await token_box.fill("not-a-token")
        await page.get_by_role("button", name="Sign in").click()
        await expect(page.get_by_role("alert")).to_have_text(
            "That token was not accepted: it is expired or not valid for this server."
        )

        await token_box.fill(token_for("jo"))
        await page.get_by_role("button", name="Sign in").click()
        await expect(page.locator("#who")).to_have_text("jo")
        await page.reload()  # the token is kept for the tab
        await expect(page.locator("#who")).to_have_text("jo")

        await page.get_by_role("button", name="Sign out").click()
        await expect(token_box).to_be_visible()
        await expect(page.get_by_role("alert")).to_have_text("You are signed out.")
        assert await page.evaluate("sessionStorage.getItem('chatmeter.token')") is None
        await page.reload()
        await expect(token_box).to_be_visible()

        # a token that expired before the page opened
        await page.goto(f"{server.url}/#token={token_for('jo', ttl_seconds=-60)}")
        await expect(page.get_by_role("alert")).to_contain_text("expired")
        assert "token=" not in page.url

        # a token that expires while the page is open (the server allows 5 s of leeway)
        expires_at = time.time() - 1 + 5
        await page.goto(f"{server.url}/#token={token_for('jo', ttl_seconds=-1)}")
        await expect(page.locator("#who")).to_have_text("jo")
        await asyncio.sleep(max(0.0, expires_at - time.time()) + 1.2)
        message = page.get_by_role("textbox", name="Message")
        await message.fill("Still there?")
        await message.press("Enter")
        await expect(token_box).to_be_visible()
        await expect(page.get_by_role("alert")).to_have_text(
            "You are signed out: your token has expired or is not valid here. "
            "Sign in again with a new token."
        )


async def test_chats_are_listed_newest_first_renamed_and_deleted(
    chatmeter: ServerFactory, open_page: Callable[..., Any]
) -> None:
    async with chatmeter(scripted(reply="Here I am.")) as server:
        first = (await api(server, "POST", "/api/chat", "kim", json={"title": "Older"})).json()
        await api(server, "POST", "/api/chat", "kim", json={"title": "Newer"})
        page: Page = await open_page(f"{server.url}/#token={token_for('kim')}")
        items = page.get_by_role("navigation", name="Chats").get_by_role("button")
        await expect(items).to_have_count(2)
        titles = await page.locator(".chat-item-title").all_text_contents()
        assert titles == ["Newer", "Older"]

        await page.get_by_role("button", name=re.compile("^Older")).click()
        await expect(page.locator("#chat-title")).to_have_text("Older")
        assert chat_id_of(page) == first["chat_id"]

        await page.get_by_role("button", name="Rename").click()
        title_box = page.get_by_role("textbox", name="Chat title")
        await title_box.fill("Trip plans")
        await title_box.press("Enter")
        await expect(page.locator("#chat-title")).to_have_text("Trip plans")
        await expect(page.locator(".chat-item-title")).to_have_text(["Newer", "Trip plans"])
        saved = (await api(server, "GET", f"/api/chat/{first['chat_id']}", "kim")).json()
        assert saved["title"] == "Trip plans"

        page.once("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
        await page.get_by_role("button", name="Delete").click()
        await expect(page.locator(".chat-item-title")).to_have_text(["Newer"])
        await expect(page.locator("#chat-title")).to_have_text("New conversation")
        gone = await api(server, "GET", f"/api/chat/{first['chat_id']}", "kim")
        assert gone.status_code == 404
        await page.reload()
        await expect(page.locator(".chat-item-title")).to_have_text(["Newer"])

        # a link to the deleted chat
        await page.goto(f"{server.url}/#chat={first['chat_id']}")
        await expect(page.get_by_role("alert")).to_contain_text("This chat no longer exists")

        # the open chat is deleted in another window, then a message is sent to it
        await page.get_by_role("button", name=re.compile("^Newer")).click()
        await expect(page.locator("#chat-title")).to_have_text("Newer")
        deleted = await api(server, "DELETE", f"/api/chat/{chat_id_of(page)}", "kim")
        assert deleted.status_code == 204
        message = page.get_by_role("textbox", name="Message")
        await message.fill("Anyone here?")
        await message.press("Enter")
        await expect(page.get_by_role("alert")).to_contain_text("This chat no longer exists")
        await expect(page.locator(".chat-item-title")).to_have_count(0)
        await expect(message).to_have_value("Anyone here?")
        # sending again starts a new chat
        await message.press("Enter")
        await expect(reply_text(page)).to_have_text("Here I am.")
        await expect(page.locator(".chat-item-title")).to_have_text(["Anyone here?"])
