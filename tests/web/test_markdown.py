"""Replies rendered as Markdown in Chromium: what a person expects to see (bold, lists,
tables, highlighted code with a Copy button), and model output written to attack the page
that runs nothing, loads nothing and links nowhere dangerous."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from playwright.async_api import Dialog, Page, Request, expect

from tests.conftest import scripted, token_for
from tests.web.pages import PHONE, ServerFactory, api, chat_id_of, reply_text, shot

CODE = 'def greet(name):\n    return f"Hello, {name}!"\n'
MARKDOWN = (
    "## Your plan\n\n"
    "This is **important** and `inline`.\n\n"
    "- first step\n"
    "- second step\n\n"
    "| Model | Tokens |\n"
    "|-------|-------:|\n"
    "| local | 1,200 |\n"
    "| gemini | 300 |\n\n"
    f"```python\n{CODE}```\n\n"
    "Read [the docs](https://example.com/docs).\n"
)

HOSTILE = (
    "<script>window.__pwned = 'script'</script>\n\n"
    "<img src=x onerror=\"window.__pwned = 'img'\">\n\n"
    "Inline <img src=x onerror=\"window.__pwned = 'inline img'\"> html.\n\n"
    "[a javascript link](javascript:window.__pwned='link')\n\n"
    "[an encoded one](JaVaScRiPt&#58;window.__pwned='encoded')\n\n"
    "<a href=\"javascript:window.__pwned='raw a'\">raw link</a>\n\n"
    "<iframe src=\"javascript:window.__pwned='iframe'\"></iframe>\n\n"
    "<svg onload=\"window.__pwned='svg'\"><script>window.__pwned='svg script'</script></svg>\n\n"
    "[a data URL](data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==)\n\n"
    "![a remote image](http://192.0.2.1/tracker.png)\n\n"
    "<details open ontoggle=\"window.__pwned='details'\">x</details>\n\n"
    "A [plain link](https://example.com/ok) stays.\n"
)
HOSTILE_CODE_BLOCK = "```html\n<script>window.__pwned='code'</script>\n```\n"


async def test_a_reply_in_markdown_renders_and_copy_puts_the_code_on_the_clipboard(
    chatmeter: ServerFactory, open_page: Callable[..., Any]
) -> None:
    async with chatmeter(scripted(reply=MARKDOWN, chunks=12, delay_ms=40)) as server:
        page: Page = await open_page(
            f"{server.url}/#token={token_for('mia')}",
            permissions=["clipboard-read", "clipboard-write"],
        )
        message = page.get_by_role("textbox", name="Message")
        await message.fill("Plan my week")
        await message.press("Enter")
        reply = reply_text(page)
        await expect(page.get_by_role("button", name="Send")).to_be_visible()

        async def check() -> None:
            await expect(reply.get_by_role("heading", name="Your plan")).to_be_visible()
            await expect(reply.locator("strong")).to_have_text("important")
            await expect(reply.locator("p code")).to_have_text("inline")
            await expect(reply.get_by_role("listitem")).to_have_text(["first step", "second step"])
            table = reply.get_by_role("table")
            await expect(table.get_by_role("columnheader")).to_have_text(["Model", "Tokens"])
            await expect(table.get_by_role("cell")).to_have_text(
                ["local", "1,200", "gemini", "300"]
            )
            code = reply.locator("pre code")
            await expect(code).to_have_text(CODE.rstrip("\n"))
            # highlighted: the keyword is marked up by highlight.js
            await expect(code.locator(".hljs-keyword").first).to_have_text("def")
            link = reply.get_by_role("link", name="the docs")
            await expect(link).to_have_attribute("href", "https://example.com/docs")
            await expect(link).to_have_attribute("target", "_blank")
            await expect(link).to_have_attribute("rel", "noopener noreferrer")
            # none of the Markdown syntax is left as text
            body = await reply.inner_text()
            assert "**" not in body and "```" not in body and "|---" not in body, body

        await check()
        copy = reply.get_by_role("button", name="Copy")
        await copy.click()
        await expect(reply.get_by_role("button", name="Copied")).to_be_visible()
        clipboard = await page.evaluate("navigator.clipboard.readText()")
        assert clipboard.rstrip("\n") == CODE.rstrip("\n")
        await shot(page, "desktop-markdown")

        # the saved reply renders the same from the history, and Copy works there too
        chat_id = chat_id_of(page)
        saved = (await api(server, "GET", f"/api/chat/{chat_id}", "mia")).json()
        assert saved["messages"][-1]["content"] == MARKDOWN
        await page.evaluate("navigator.clipboard.writeText('')")
        await page.reload()
        await check()
        await reply.get_by_role("button", name="Copy").click()
        await expect(reply.get_by_role("button", name="Copied")).to_be_visible()
        assert (await page.evaluate("navigator.clipboard.readText()")).rstrip() == CODE.rstrip()


async def test_hostile_model_output_runs_nothing_and_loads_nothing(
    chatmeter: ServerFactory, open_page: Callable[..., Any]
) -> None:
    reply = HOSTILE + "\n" + HOSTILE_CODE_BLOCK
    async with chatmeter(scripted(reply=reply, chunks=25, delay_ms=20)) as server:
        page: Page = await open_page(f"{server.url}/#token={token_for('nat')}")
        dialogs: list[str] = []
        foreign: list[str] = []
        page.on("dialog", lambda dialog: _record_dialog(dialog, dialogs))
        page.on("request", lambda request: _record_foreign(request, server.url, foreign))
        message = page.get_by_role("textbox", name="Message")
        await message.fill("Say something nasty")
        await message.press("Enter")
        await expect(reply_text(page)).to_contain_text("stays.")
        await expect(page.get_by_role("button", name="Send")).to_be_visible()

        async def check_inert() -> None:
            body = reply_text(page)
            await expect(body).to_contain_text("A plain link stays.")
            assert await page.evaluate("typeof window.__pwned") == "undefined"
            dangerous = "script, iframe, img, svg, object, embed, form, style, details[open]"
            assert await page.locator(f"#messages :is({dangerous})").count() == 0
            handlers = await page.evaluate(
                """() => [...document.querySelectorAll('#messages *')].flatMap(
                       (node) => [...node.attributes].map((a) => a.name)
                   ).filter((name) => name.startsWith('on'))"""
            )
            assert handlers == []
            # every link that is left points to http(s), in a new tab, without an opener
            links = await body.locator("a[href]").evaluate_all(
                "links => links.map(a => [a.getAttribute('href'), a.target, a.rel])"
            )
            assert links, "the plain link should remain"
            for href, target, rel in links:
                assert href.startswith(("https://", "http://")), href
                assert (target, rel) == ("_blank", "noopener noreferrer")
            # what was written as HTML is shown as text, readable and inert
            await expect(body).to_contain_text("<script>window.__pwned = 'script'</script>")
            await expect(body.locator("pre code")).to_have_text(
                "<script>window.__pwned='code'</script>"
            )
            # the neutralised links can be clicked: still nothing runs
            for name in ("a javascript link", "an encoded one", "a data URL"):
                await body.get_by_text(name, exact=True).click()
            await body.get_by_text("raw link").first.click()
            assert await page.evaluate("typeof window.__pwned") == "undefined"
            assert len(page.context.pages) == 1  # no tab was opened
            assert dialogs == [] and foreign == [], (dialogs, foreign)

        await check_inert()
        await shot(page, "desktop-hostile-markdown")
        await page.reload()  # the history renders the saved reply the same way
        await expect(reply_text(page)).to_contain_text("stays.")
        await check_inert()


def _record_dialog(dialog: Dialog, seen: list[str]) -> None:
    seen.append(dialog.message)


def _record_foreign(request: Request, origin: str, seen: list[str]) -> None:
    if not request.url.startswith(origin + "/"):
        seen.append(request.url)


async def test_the_view_stays_where_the_reader_scrolled_while_a_reply_streams(
    chatmeter: ServerFactory, open_page: Callable[..., Any]
) -> None:
    lines = "".join(f"- line {n}\n" for n in range(1, 121))
    async with chatmeter(scripted(reply=lines, chunks=120, delay_ms=60)) as server:
        page: Page = await open_page(f"{server.url}/#token={token_for('ola')}")
        message = page.get_by_role("textbox", name="Message")
        await message.fill("A long list, please")
        await message.press("Enter")
        messages = page.locator("#messages")
        # while the reader stays at the bottom, the view follows the reply down
        await expect(reply_text(page)).to_contain_text("line 30")
        at_bottom = "m => m.scrollHeight - m.scrollTop - m.clientHeight < 80"
        assert await messages.evaluate("m => m.scrollHeight > m.clientHeight + 200")
        assert await messages.evaluate(at_bottom)
        # the reader scrolls up: the growing reply no longer moves the view
        await messages.evaluate("m => { m.scrollTop = 40; }")
        await expect(reply_text(page)).to_contain_text("line 80")
        assert await messages.evaluate("m => m.scrollTop") == 40
        await expect(page.get_by_role("button", name="Send")).to_be_visible()
        await expect(reply_text(page).get_by_role("listitem")).to_have_count(120)
        assert await messages.evaluate("m => m.scrollTop") == 40


WIDE_TABLE = (
    "| first column | second column | third column | fourth column |\n"
    "|---|---|---|---|\n"
    "| alphabetical | bibliography | chronological | documentation |\n"
)


async def test_a_wide_table_on_a_phone_scrolls_sideways_and_keeps_its_words_whole(
    chatmeter: ServerFactory, open_page: Callable[..., Any]
) -> None:
    async with chatmeter(scripted(reply=WIDE_TABLE, chunks=3)) as server:
        page: Page = await open_page(f"{server.url}/#token={token_for('tia')}", viewport=PHONE)
        message = page.get_by_role("textbox", name="Message")
        await message.fill("A table, please")
        await message.press("Enter")
        await expect(page.locator(".msg-tokens")).to_have_count(1)
        cell = page.locator("#messages td", has_text="documentation")
        # one line box: the word is not broken letter by letter to squeeze the table
        lines = await cell.evaluate(
            "td => { const r = document.createRange(); r.selectNodeContents(td);"
            " return r.getClientRects().length; }"
        )
        assert lines == 1
        scroller = page.locator("#messages .table-scroll")
        assert await scroller.evaluate("box => box.scrollWidth > box.clientWidth")
        assert await page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
