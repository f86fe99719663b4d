"""The model picker, the usage panel and the admin console, in Chromium as people use
them, against a server with priced models and plans (SPEC 10 and 13)."""

from __future__ import annotations

import re
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
from playwright.async_api import Page, expect

from chatmeter.config import PlanConfig
from tests.conftest import make_settings, scripted, token_for
from tests.support.server import RunningServer, serve
from tests.support.sse import stream_message
from tests.web.pages import PHONE, api, assistant_replies, chat_id_of, reply_text, shot

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
MODELS = {
    "main": scripted(reply="The main model answers.", chunks=3),
    "priced": scripted(
        reply="The **priced** model answers.",
        chunks=3,
        price_input=Decimal("0.30"),
        price_output=Decimal("2.50"),
    ),
}
PLANS = {
    "free": PlanConfig(token_limit=50_000, spend_limit=Decimal("0.50"), period="day"),
    "pro": PlanConfig(token_limit=2_000_000, spend_limit=Decimal("20"), period="month"),
}


def plans_server(sqlite_url: str) -> Any:
    settings = make_settings(
        sqlite_url, default_model="main", models=MODELS, plans=PLANS, default_plan="free"
    )
    return serve(settings)


async def test_the_model_picker_starts_a_chat_on_the_chosen_model(
    sqlite_url: str, open_page: Callable[..., Any]
) -> None:
    async with plans_server(sqlite_url) as server:
        page: Page = await open_page(f"{server.url}/#token={token_for('rae')}")
        picker = page.get_by_label("Model")
        await expect(picker).to_have_value("main")  # the default is chosen
        options = await picker.locator("option").all_text_contents()
        assert "main" in options  # no prices: no price shown
        assert "priced · $0.30 in / $2.50 out per 1M tokens" in options

        await picker.select_option("priced")
        message = page.get_by_role("textbox", name="Message")
        await message.fill("Which model are you?")
        await page.get_by_role("button", name="Send").click()
        await expect(reply_text(page)).to_have_text("The priced model answers.")
        await expect(reply_text(page).locator("strong")).to_have_text("priced")
        await expect(page.locator("#chat-model")).to_have_text("priced")
        chat = (await api(server, "GET", f"/api/chat/{chat_id_of(page)}", "rae")).json()
        assert chat["model"] == "priced"

        # picking another model while a chat is open starts a new chat on it
        first = chat_id_of(page)
        await picker.select_option("main")
        await expect(page.locator("#chat-title")).to_have_text("New conversation")
        await message.fill("And now?")
        await message.press("Enter")
        await expect(reply_text(page)).to_have_text("The main model answers.")
        second = chat_id_of(page)
        assert second != first
        chat = (await api(server, "GET", f"/api/chat/{second}", "rae")).json()
        assert chat["model"] == "main"


async def test_the_usage_panel_matches_get_api_usage(
    sqlite_url: str, open_page: Callable[..., Any]
) -> None:
    async with plans_server(sqlite_url) as server:
        page: Page = await open_page(f"{server.url}/#token={token_for('sam')}")
        await page.get_by_label("Model").select_option("priced")
        message = page.get_by_role("textbox", name="Message")
        await message.fill("Spend a little")
        await message.press("Enter")
        await expect(page.get_by_role("status")).to_contain_text("This reply used")

        usage = (await api(server, "GET", "/api/usage", "sam")).json()
        assert usage["plan"] == "free" and usage["spend_micros"] > 0
        panel = page.locator("#usage-panel")
        await expect(panel).to_be_visible()
        await expect(panel.locator("#usage-plan")).to_have_text("free")
        await expect(panel.locator("#usage-period")).to_contain_text("day")
        resets = panel.locator("#usage-resets")
        await expect(resets).to_have_attribute("datetime", usage["resets_at"])
        await expect(panel.locator("#usage-tokens")).to_have_text(
            f"{usage['total_tokens_used']:,} of {usage['token_limit']:,}"
        )
        spend = Decimal(usage["spend_micros"]) / 1_000_000
        places = spend.as_tuple().exponent
        assert isinstance(places, int)  # a finite amount ("n", "N", "F" are NaN and inf)
        await expect(panel.locator("#usage-spend")).to_have_text(
            f"${spend.normalize():f} of $0.50" if places < -2 else f"${spend:.2f} of $0.50"
        )
        # the chart: 30 days, today's bar is the tokens used today
        summary = (await api(server, "GET", "/api/usage/summary?group_by=day", "sam")).json()
        bars = panel.locator(".chart-bar")
        await expect(bars).to_have_count(30)
        today = summary["rows"][-1]
        bar = panel.locator(f'.chart-bar[data-day="{today["day"]}"]')
        await expect(bar).to_have_attribute("data-value", str(usage["total_tokens_used"]))
        chart = panel.get_by_role("img", name=re.compile("Tokens by day"))
        await expect(chart).to_be_visible()
        await shot(page, "desktop-usage")


async def test_the_admin_sets_a_plan_and_downloads_the_csv(
    sqlite_url: str, open_page: Callable[..., Any], tmp_path: Path
) -> None:
    async with plans_server(sqlite_url) as server:
        await use(server, "tess")
        await use(server, "uma")
        page: Page = await open_page(
            f"{server.url}/admin#token={token_for('root', admin=True)}", accept_downloads=True
        )
        users = page.get_by_role("table")
        await expect(users.get_by_role("rowheader")).to_have_text(["tess", "uma"])
        tess = users.get_by_role("row", name=re.compile("^tess"))
        await expect(tess.get_by_label("Plan for tess")).to_have_value("free")

        await tess.get_by_label("Plan for tess").select_option("pro")
        await expect(page.get_by_role("status")).to_have_text("tess is now on the pro plan.")
        assert (await api(server, "GET", "/api/usage", "tess")).json()["plan"] == "pro"

        limit = users.get_by_label("Token limit for uma")
        await limit.fill("777")
        await limit.press("Enter")
        await expect(page.get_by_role("status")).to_have_text("uma may now use 777 tokens.")
        assert (await api(server, "GET", "/api/usage", "uma")).json()["token_limit"] == 777
        # past what a page's number holds exactly: refused in words, not sent rounded
        await limit.fill("9007199254740993")
        await limit.press("Enter")
        await expect(page.get_by_role("alert")).to_have_text(
            "A token limit is a whole number from 0 to 9,007,199,254,740,991."
        )
        assert (await api(server, "GET", "/api/usage", "uma")).json()["token_limit"] == 777

        # search
        await page.get_by_label("Search users").fill("UM")
        await page.get_by_role("button", name="Search").click()
        await expect(users.get_by_role("rowheader")).to_have_text(["uma"])

        # everyone's chart by day
        await expect(page.locator("#chart .chart-bar")).to_have_count(30)

        # the CSV of a date range
        summary = (
            await api(server, "GET", "/api/admin/usage/summary?group_by=day", "root", admin=True)
        ).json()
        await page.get_by_label("Group by").select_option("user")
        async with page.expect_download() as info:
            await page.get_by_role("link", name="Download CSV").click()
        download = await info.value
        saved = tmp_path / "usage.csv"
        await download.save_as(saved)
        text = saved.read_bytes().decode()
        expected = await api(
            server,
            "GET",
            f"/api/admin/usage/summary?format=csv&group_by=user&from={summary['from']}"
            f"&to={summary['to']}",
            "root",
            admin=True,
        )
        assert text == expected.text
        assert text.splitlines()[0].startswith("user,") and "tess" in text and "uma" in text
        assert download.suggested_filename.endswith("-by-user.csv")

        # the admin page at phone width, for the README
        await page.get_by_label("Search users").fill("")
        await page.get_by_role("button", name="Search").click()
        await expect(users.get_by_role("rowheader")).to_have_count(2)
        phone = await open_page(
            f"{server.url}/admin#token={token_for('root', admin=True)}",
            viewport=PHONE,
            is_mobile=True,
            has_touch=True,
        )
        await expect(phone.get_by_role("table").get_by_role("rowheader")).to_have_count(2)
        await expect(phone.locator("#chart .chart-bar")).to_have_count(30)
        overflow = await phone.evaluate(
            "document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert overflow <= 0, f"the admin page scrolls sideways by {overflow}px"
        DOCS.mkdir(exist_ok=True)
        await phone.screenshot(path=str(DOCS / "admin-phone.png"), full_page=True)


async def test_a_non_admin_sees_no_admin_data(
    sqlite_url: str, open_page: Callable[..., Any]
) -> None:
    async with plans_server(sqlite_url) as server:
        await use(server, "secret-user")
        page: Page = await open_page(f"{server.url}/admin#token={token_for('vic')}")
        await expect(page.get_by_role("alert")).to_contain_text(
            "This page is for administrators only"
        )
        await expect(page.get_by_role("table")).to_be_hidden()
        assert await page.locator("#users tr").count() == 0
        assert "secret-user" not in await page.content()
        await expect(page.get_by_role("link", name="Download CSV")).to_be_hidden()


async def test_the_chat_page_at_phone_width_for_the_readme(
    sqlite_url: str, open_page: Callable[..., Any]
) -> None:
    reply = "Here is **a list**:\n\n- tokens\n- spend\n\n```python\nprint('hi')\n```\n"
    models = {"main": scripted(reply=reply, chunks=4)}
    settings = make_settings(
        sqlite_url, default_model="main", models=models, plans=PLANS, default_plan="free"
    )
    async with serve(settings) as server:
        page: Page = await open_page(
            f"{server.url}/#token={token_for('wes')}",
            viewport=PHONE,
            is_mobile=True,
            has_touch=True,
        )
        message = page.get_by_role("textbox", name="Message")
        await message.fill("What does chatmeter count?")
        await page.get_by_role("button", name="Send").tap()
        await expect(reply_text(page).get_by_role("listitem")).to_have_count(2)
        await expect(page.get_by_role("button", name="Send")).to_be_visible()
        await expect(assistant_replies(page)).to_have_count(1)
        await expect(page.locator("#usage-plan")).to_have_text("free")
        overflow = await page.evaluate(
            "document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert overflow <= 0, f"the page scrolls sideways by {overflow}px"
        DOCS.mkdir(exist_ok=True)
        await page.screenshot(path=str(DOCS / "screenshot-phone.png"))


async def use(server: RunningServer, user: str) -> None:
    """The user is seen by chatmeter and has used a little."""
    chat = await api(server, "POST", "/api/chat", user, json={})
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        result = await stream_message(http, chat.json()["chat_id"], "hi", token_for(user))
    assert result.last["done"] is True
