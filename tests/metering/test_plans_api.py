"""Plans over real HTTP on SQLite and PostgreSQL (SPEC section 10): cost on the end event,
the message and the ledger; spend limits under concurrency; rate limits; periods seen
at once after a boundary nobody was there for; assigning plans; the models and plans."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import sqlalchemy as sa

from chatmeter.config import PlanConfig
from chatmeter.db.tables import messages, usage_events, user_usage, utcnow
from chatmeter.metering.cost import Prices, cost_micros
from chatmeter.metering.periods import bounds, to_micros
from chatmeter.providers.base import Usage
from tests.conftest import auth, make_settings, scripted, token_for
from tests.streaming.test_exchange import new_chat
from tests.support.db import (
    balanced,
    chat_rows,
    holds_a_reservation,
    ledger_row,
    period_books,
)
from tests.support.server import RunningServer, serve
from tests.support.shared_server import fresh, shared_server_fixtures
from tests.support.sse import stream_message
from tests.support.waiting import eventually

PARIS = ZoneInfo("Europe/Paris")
REPLY = "A priced reply, long enough to cost a few tokens of output."
PRICED = scripted(
    reply=REPLY,
    chunks=3,
    max_output_tokens=40,
    price_input=Decimal("0.30"),
    price_cached_input=Decimal("0.075"),
    price_output=Decimal("2.50"),
)
SLOW = scripted(reply=" ".join(f"w{i}" for i in range(20)), chunks=20, delay_ms=100)
PLANS = {
    "free": PlanConfig(token_limit=5000, period="day", requests_per_minute=3),
    "solo": PlanConfig(token_limit=100_000, concurrent_replies=1),
    "pro": PlanConfig(spend_limit=Decimal("20"), period="month"),
    "tight": PlanConfig(token_limit=10**9, spend_limit=Decimal("0.002"), period="week"),
}
backend, server, client = shared_server_fixtures(
    models={"priced": PRICED, "slow": SLOW},
    plans=PLANS,
    timezone="Europe/Paris",
    currency="EUR",
)


def admin() -> dict[str, str]:
    return auth(fresh("admin"), admin=True)


async def on_plan(client: httpx.AsyncClient, user: str, plan: str) -> dict[str, Any]:
    response = await client.put(
        f"/api/admin/users/{user}/plan", json={"plan": plan}, headers=admin()
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def usage(client: httpx.AsyncClient, user: str) -> dict[str, Any]:
    response = await client.get("/api/usage", headers=auth(user))
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


# -- cost ------------------------------------------------------------------------------


async def test_cost_is_on_the_end_event_the_message_and_the_ledger(
    client: httpx.AsyncClient, server: RunningServer
) -> None:
    user = fresh("carl")
    chat = await new_chat(client, user, model="priced")
    result = await stream_message(client, chat, "What does this cost?", token_for(user))
    assert result.status == 200, result.body
    end = result.last["usage"]
    expected = cost_micros(
        Usage(end["prompt_tokens"], end["completion_tokens"], end["thinking_tokens"]),
        Prices(Decimal("0.30"), Decimal("0.075"), Decimal("2.50"), Decimal("2.50")),
    )
    assert end["cost_micros"] == expected > 0
    # exact: prompt x 0.30 + completion x 2.50, half up
    exact = Decimal(end["prompt_tokens"]) * Decimal("0.30") + Decimal(
        end["completion_tokens"]
    ) * Decimal("2.50")
    assert abs(Decimal(expected) - exact) <= Decimal("0.5")
    message_id = result.last["message_id"]
    rows = await chat_rows(server.engine, chat)
    assert rows[-1].cost_micros == expected and rows[0].cost_micros == 0
    assert (await ledger_row(server.engine, message_id)).cost_micros == expected
    mine = await usage(client, user)
    assert mine["spend_micros"] == expected and mine["currency"] == "EUR"
    events = (await client.get("/api/usage/events", headers=auth(user))).json()["events"]
    assert events[0]["cost_micros"] == expected


async def test_a_model_without_prices_costs_nothing(client: httpx.AsyncClient) -> None:
    user = fresh("fay")
    chat = await new_chat(client, user)
    result = await stream_message(client, chat, "Free?", token_for(user))
    assert result.last["usage"]["cost_micros"] == 0
    assert (await usage(client, user))["spend_micros"] == 0


# -- spend limits ----------------------------------------------------------------------


async def test_concurrent_streams_never_pass_the_spend_limit(
    client: httpx.AsyncClient, server: RunningServer
) -> None:
    user = fresh("tina")
    await on_plan(client, user, "tight")
    chats = [await new_chat(client, user, model="priced") for _ in range(30)]
    limits = httpx.Limits(max_connections=100)
    async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as many:
        results = await asyncio.gather(
            *(
                stream_message(many, chat, f"message {i}", token_for(user))
                for i, chat in enumerate(chats)
            )
        )
    served = [r for r in results if r.status == 200]
    refused = [r for r in results if r.status != 200]
    assert served and refused, "the spend limit should bind"
    for r in refused:
        assert (r.status, r.body["code"]) == (403, "SPEND_LIMIT_EXCEEDED"), r.body
        assert datetime.fromisoformat(r.body["resets_at"]) > utcnow()
    spent = sum(r.last["usage"]["cost_micros"] for r in served)
    state = await period_books(server.engine, user)
    assert state.spend == spent == state.ledger_spend <= 2000
    assert balanced(state)
    assert (state.reserved, state.reserved_micros, state.active) == (0, 0, 0)
    mine = await usage(client, user)
    assert mine["spend_micros"] == spent and mine["spend_limit_micros"] == 2000


async def test_a_spent_token_budget_with_a_period_says_when_it_resets(
    client: httpx.AsyncClient,
) -> None:
    user = fresh("tom")
    await on_plan(client, user, "free")
    limit = await client.put(
        f"/api/admin/users/{user}/limit", json={"token_limit": 5}, headers=admin()
    )
    assert limit.json()["token_limit"] == 5
    chat = await new_chat(client, user)
    result = await stream_message(client, chat, "Hello", token_for(user))
    assert (result.status, result.body["code"]) == (403, "TOKEN_BUDGET_EXCEEDED")
    tomorrow = bounds("day", utcnow(), PARIS)
    assert tomorrow is not None
    assert datetime.fromisoformat(result.body["resets_at"]) == tomorrow.end
    # the plan assigned again replaces the override with the plan's limit
    again = await on_plan(client, user, "free")
    assert again["token_limit"] == 5000


# -- rate limits -----------------------------------------------------------------------


async def test_requests_per_minute_allows_a_burst_then_refuses_saving_nothing(
    client: httpx.AsyncClient, server: RunningServer
) -> None:
    user = fresh("rita")
    await on_plan(client, user, "free")
    chats = [await new_chat(client, user) for _ in range(4)]
    for chat in chats[:3]:
        ok = await stream_message(client, chat, "Hi", token_for(user))
        assert ok.status == 200, ok.body
    before = await period_books(server.engine, user)
    refused = await stream_message(client, chats[3], "Hi", token_for(user))
    assert (refused.status, refused.body["code"]) == (429, "RATE_LIMITED")
    retry = refused.headers["retry-after"]
    assert retry.isdigit() and 1 <= int(retry) <= 20  # one request refills in 20 s
    assert await chat_rows(server.engine, chats[3]) == []
    after = await period_books(server.engine, user)
    assert after == before
    # checked after the chat's owner: another user's chat is still 403 FORBIDDEN
    other = await new_chat(client, fresh("owner"))
    forbidden = await stream_message(client, other, "Hi", token_for(user))
    assert (forbidden.status, forbidden.body["code"]) == (403, "FORBIDDEN")


async def test_concurrent_replies_are_capped_across_chats(
    client: httpx.AsyncClient, server: RunningServer
) -> None:
    user = fresh("sol")
    await on_plan(client, user, "solo")
    first, second = await new_chat(client, user, model="slow"), await new_chat(client, user)
    streaming = asyncio.create_task(stream_message(client, first, "Go", token_for(user)))
    await eventually(lambda: holds_a_reservation(server.engine, user))
    refused = await stream_message(client, second, "Me too", token_for(user))
    assert (refused.status, refused.body["code"]) == (429, "RATE_LIMITED")
    assert refused.headers["retry-after"] == "1"
    assert await chat_rows(server.engine, second) == []
    assert (await streaming).last["done"] is True
    again = await stream_message(client, second, "Now?", token_for(user))
    assert again.status == 200 and again.last["done"] is True
    state = await period_books(server.engine, user)
    assert state.active == 0 and balanced(state)


# -- periods ---------------------------------------------------------------------------


async def test_usage_after_a_boundary_nobody_was_there_for(
    client: httpx.AsyncClient, server: RunningServer
) -> None:
    user = fresh("ned")
    await on_plan(client, user, "free")
    today = bounds("day", utcnow(), PARIS)
    assert today is not None
    yesterday = today.start - timedelta(hours=12)
    # the row as a server left it yesterday: nothing has run since
    async with server.engine.begin() as conn:
        await conn.execute(
            sa.update(user_usage)
            .where(user_usage.c.user_id == user)
            .values(total_tokens_used=4000, spend_micros=77, period_start=to_micros(yesterday))
        )
    mine = await usage(client, user)
    assert (mine["total_tokens_used"], mine["spend_micros"]) == (0, 0)
    assert mine["tokens_remaining"] == 5000
    assert datetime.fromisoformat(mine["period_start"]) == today.start
    assert datetime.fromisoformat(mine["resets_at"]) == today.end
    assert (mine["plan"], mine["period"]) == ("free", "day")
    assert mine["period_start"].endswith(("+01:00", "+02:00")), "shown in Paris time"
    chat = await new_chat(client, user)
    result = await stream_message(client, chat, "First of the day", token_for(user))
    state = await period_books(server.engine, user)
    assert state.total == result.last["tokens_used"] and balanced(state)
    assert state.period_start == to_micros(today.start)


async def test_replies_streaming_across_period_boundaries_keep_the_books(
    database_url: str,
) -> None:
    slow = scripted(reply=" ".join(f"w{i}" for i in range(30)), chunks=30, delay_ms=100)
    settings = make_settings(
        database_url,
        models={"slow": slow},
        plans={"tick": PlanConfig(period="2s")},
        default_plan="tick",
    )
    async with serve(settings) as running:
        async with httpx.AsyncClient(base_url=running.url, timeout=60) as http:
            chats = [await new_chat(http, "tick", model="slow") for _ in range(3)]
            # each reply lasts about 3 s: every one crosses at least one boundary
            results = await asyncio.gather(
                *(stream_message(http, chat, "Go", token_for("tick")) for chat in chats)
            )
            assert all(r.last["done"] is True for r in results)
            state = await period_books(running.engine, "tick")
            assert balanced(state)
            assert (state.reserved, state.active) == (0, 0)
            shown = (await http.get("/api/usage", headers=auth("tick"))).json()
            assert shown["period"] == "2s" and shown["plan"] == "tick"


# -- plans and models ------------------------------------------------------------------


async def test_changing_the_default_plan_moves_every_user_no_admin_assigned(
    database_url: str,
) -> None:
    """SPEC section 10: a user has CHATMETER_DEFAULT_PLAN "until an admin assigns
    another", so a restart on a new default moves the users already seen, not only the
    new ones; a user an admin assigned keeps that plan, even the old default's."""
    plans = {
        "starter": PlanConfig(token_limit=5000),
        "daily": PlanConfig(token_limit=300, period="day", requests_per_minute=7),
    }
    before = make_settings(
        database_url, models={"priced": PRICED}, plans=plans, default_plan="starter"
    )
    async with serve(before) as running:
        async with httpx.AsyncClient(base_url=running.url, timeout=30) as http:
            chat = await new_chat(http, "seen", model="priced")
            first = await stream_message(http, chat, "On the first default", token_for("seen"))
            await on_plan(http, "kept", "starter")
            assert (await usage(http, "seen"))["plan"] == "starter"
    after = make_settings(
        database_url, models={"priced": PRICED}, plans=plans, default_plan="daily"
    )
    async with serve(after) as running:
        async with httpx.AsyncClient(base_url=running.url, timeout=30) as http:
            moved = await usage(http, "seen")
            assert (moved["plan"], moved["period"], moved["token_limit"]) == ("daily", "day", 300)
            assert moved["requests_per_minute"] == 7
            # the day's usage so far is the new period's: what was spent today counts
            spent_today = first.last["tokens_used"]
            assert moved["total_tokens_used"] == spent_today
            chat = await new_chat(http, "seen", model="priced")
            result = await stream_message(http, chat, "On the second", token_for("seen"))
            assert result.last["done"] is True
            both = spent_today + result.last["tokens_used"]
            assert (await usage(http, "seen"))["total_tokens_used"] == both
            assert balanced(await period_books(running.engine, "seen"))
            kept = await usage(http, "kept")
            assert (kept["plan"], kept["token_limit"]) == ("starter", 5000)
            assert (await usage(http, "newcomer"))["plan"] == "daily"


async def test_an_admin_puts_a_user_back_on_the_default_followed_from_then_on(
    database_url: str,
) -> None:
    """`{"plan": null}` undoes an assignment: the user is on the configured default, and
    on the next default after a restart, as a user no admin assigned; assigning the
    default's name instead pins that plan."""
    plans = {
        "starter": PlanConfig(token_limit=5000),
        "daily": PlanConfig(token_limit=300, period="day"),
        "pro": PlanConfig(token_limit=90_000),
    }
    before = make_settings(database_url, plans=plans, default_plan="starter")
    async with serve(before) as running:
        async with httpx.AsyncClient(base_url=running.url, timeout=30) as http:
            for user in ("back", "pinned"):
                await on_plan(http, user, "pro")
            limited = await http.put(
                "/api/admin/users/back/limit", json={"token_limit": 7}, headers=admin()
            )
            assert limited.status_code == 200, limited.text
            await on_plan(http, "pinned", "starter")
            response = await http.put(
                "/api/admin/users/back/plan", json={"plan": None}, headers=admin()
            )
            assert response.status_code == 200, response.text
            # the default's limit, not the admin's override of the plan it left
            assert (response.json()["plan"], response.json()["token_limit"]) == ("starter", 5000)
            assert await usage(http, "back") == response.json()
    after = make_settings(database_url, plans=plans, default_plan="daily")
    async with serve(after) as running:
        async with httpx.AsyncClient(base_url=running.url, timeout=30) as http:
            moved = await usage(http, "back")
            assert (moved["plan"], moved["token_limit"]) == ("daily", 300)
            pinned = await usage(http, "pinned")
            assert (pinned["plan"], pinned["token_limit"]) == ("starter", 5000)


async def test_a_plan_whose_period_became_a_day_keeps_todays_usage_and_budget(
    database_url: str,
) -> None:
    """SPEC section 10: the totals are always the sums of the current period's ledger
    rows. A restart on which a plan's period is a day instead of a month starts the
    users' totals with what they spent today (not from 0), and the day's budget
    holds it: the API shows it, the admin's list too, and a request it leaves no
    room for is refused."""
    month = {"metered": PlanConfig(token_limit=100_000, period="month")}
    before = make_settings(
        database_url, models={"priced": PRICED}, plans=month, default_plan="metered"
    )
    async with serve(before) as running:
        async with httpx.AsyncClient(base_url=running.url, timeout=30) as http:
            chat = await new_chat(http, "daisy", model="priced")
            # a long question: today's usage is more than the next request's prompt
            question = "How much does this cost me today? " * 12
            spent = await stream_message(http, chat, question, token_for("daisy"))
            assert spent.last["done"] is True
    today = spent.last["tokens_used"]
    # the day allows 5 tokens more than today's: no prompt fits in them
    day = {"metered": PlanConfig(token_limit=today + 5, period="day")}
    after = make_settings(
        database_url, models={"priced": PRICED}, plans=day, default_plan="metered"
    )
    async with serve(after) as running:
        async with httpx.AsyncClient(base_url=running.url, timeout=30) as http:
            shown = await usage(http, "daisy")
            assert (shown["period"], shown["total_tokens_used"]) == ("day", today)
            assert shown["tokens_remaining"] == 5
            assert shown["spend_micros"] == spent.last["usage"]["cost_micros"]
            listed = await http.get("/api/admin/users?q=daisy", headers=admin())
            assert listed.json()["users"][0]["total_tokens_used"] == today
            chat = await new_chat(http, "daisy", model="priced")
            refused = await stream_message(http, chat, "And more", token_for("daisy"))
            assert refused.status == 403, refused.body
            assert refused.body["code"] == "TOKEN_BUDGET_EXCEEDED"
            state = await period_books(running.engine, "daisy")
            assert state.total == today and balanced(state)


async def test_unknown_plan_is_refused_and_changes_nothing(client: httpx.AsyncClient) -> None:
    user = fresh("uma")
    before = await usage(client, user)
    for body in ({"plan": "gold"}, {"plan": "FREE"}):
        response = await client.put(f"/api/admin/users/{user}/plan", json=body, headers=admin())
        assert response.status_code == 400
        assert response.json()["code"] == "UNKNOWN_PLAN"
    refused: list[object] = [{}, {"plan": 5}, {"plan": ""}, {"plan": "free", "x": 1}, [], "free"]
    for bad in refused:
        response = await client.put(f"/api/admin/users/{user}/plan", json=bad, headers=admin())
        assert (response.status_code, response.json()["code"]) == (400, "INVALID_REQUEST")
    assert await usage(client, user) == before
    forbidden = await client.put(
        f"/api/admin/users/{user}/plan", json={"plan": "pro"}, headers=auth(user)
    )
    assert (forbidden.status_code, forbidden.json()["code"]) == (403, "FORBIDDEN")


async def test_assigning_a_plan_shows_its_limits(client: httpx.AsyncClient) -> None:
    user = fresh("pia")
    shown = await on_plan(client, user, "pro")
    assert shown["plan"] == "pro" and shown["period"] == "month"
    assert shown["token_limit"] is None and shown["tokens_remaining"] is None
    assert shown["spend_limit_micros"] == 20_000_000
    assert shown["requests_per_minute"] is None and shown["concurrent_replies"] is None
    month = bounds("month", utcnow(), PARIS)
    assert month is not None
    assert datetime.fromisoformat(shown["resets_at"]) == month.end
    assert await usage(client, user) == shown


async def test_admin_lists_the_plans(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/admin/plans", headers=admin())
    assert response.status_code == 200
    plans = {p["name"]: p for p in response.json()["plans"]}
    assert set(plans) == {"default", "free", "solo", "pro", "tight"}
    assert plans["free"] == {
        "name": "free",
        "default": False,
        "token_limit": 5000,
        "spend_limit": None,
        "spend_limit_micros": None,
        "period": "day",
        "requests_per_minute": 3,
        "concurrent_replies": None,
    }
    assert plans["tight"]["spend_limit"] == 0.002
    assert plans["default"]["default"] is True
    user = await client.get("/api/admin/plans", headers=auth(fresh("u")))
    assert user.status_code == 403


async def test_models_are_listed_without_keys_or_urls(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/models", headers=auth(fresh("m")))
    assert response.status_code == 200
    body = response.json()
    models = {m["name"]: m for m in body["models"]}
    assert {"local", "scripted", "priced", "slow"} <= set(models)
    assert models["priced"] == {
        "name": "priced",
        "provider": "scripted",
        "context_window": 8192,
        "max_output_tokens": 40,
        "default": False,
        "prices": {"input": 0.3, "cached_input": 0.075, "output": 2.5, "thinking": 2.5},
    }
    assert models["scripted"]["default"] is True
    text = response.text
    assert "api_key" not in text and "base_url" not in text and "http" not in text
    unauthenticated = await client.get("/api/models")
    assert unauthenticated.status_code == 401


# -- summaries -------------------------------------------------------------------------


async def test_summaries_by_day_model_and_user_and_as_csv(
    client: httpx.AsyncClient, server: RunningServer
) -> None:
    user = fresh("sue")
    ends = []
    for model in ("priced", "priced", "scripted"):
        chat = await new_chat(client, user, model=model)
        ends.append((model, (await stream_message(client, chat, "Sum me", token_for(user))).last))
    today = utcnow().astimezone(PARIS).date().isoformat()
    by_day = await client.get("/api/usage/summary", headers=auth(user))
    assert by_day.status_code == 200, by_day.text
    body = by_day.json()
    assert body["currency"] == "EUR" and body["group_by"] == "day" and body["to"] == today
    [row] = body["rows"]
    assert row["day"] == today and row["requests"] == 3
    assert row["total_tokens"] == sum(end["tokens_used"] for _, end in ends)
    assert row["cost_micros"] == sum(end["usage"]["cost_micros"] for _, end in ends)
    by_model = (await client.get("/api/usage/summary?group_by=model", headers=auth(user))).json()[
        "rows"
    ]
    assert [(r["model"], r["requests"]) for r in by_model] == [("priced", 2), ("scripted", 1)]
    everyone = await client.get(
        f"/api/admin/usage/summary?group_by=user&from={today}&to={today}", headers=admin()
    )
    mine = [r for r in everyone.json()["rows"] if r["user"] == user]
    assert mine and mine[0]["requests"] == 3
    as_csv = await client.get(
        "/api/admin/usage/summary?group_by=model", headers={**admin(), "Accept": "text/csv"}
    )
    assert as_csv.status_code == 200
    assert as_csv.headers["content-type"].startswith("text/csv")
    lines = as_csv.text.splitlines()
    assert lines[0] == (
        "model,requests,prompt_tokens,completion_tokens,thinking_tokens,cached_tokens,"
        "total_tokens,cost_micros"
    )
    assert any(line.startswith('"priced",') for line in lines[1:])
    by_format = await client.get("/api/admin/usage/summary?format=csv", headers=admin())
    assert by_format.text.startswith("day,requests,")


async def test_a_row_in_the_last_moment_of_a_day_is_summed_in_that_day(
    client: httpx.AsyncClient, server: RunningServer
) -> None:
    # SQLite's strftime rounds to the millisecond: a row in the last half millisecond
    # of a quarter hour was grouped in the next one, so one written just before local
    # midnight was reported on the following day, outside the range asked for
    user = fresh("midnight")
    midnight = datetime(2026, 3, 30, tzinfo=PARIS)  # the day before changed to summer time
    moments = [midnight - timedelta(microseconds=1), midnight - timedelta(microseconds=400)]
    async with server.engine.begin() as conn:
        await conn.execute(
            usage_events.insert(),
            [
                {
                    "event_id": uuid.uuid4(),
                    "user_id": user,
                    "chat_id": None,
                    "message_id": uuid.uuid4(),
                    "model": "scripted",
                    "prompt_tokens": 1,
                    "completion_tokens": 1,
                    "thinking_tokens": 0,
                    "cached_tokens": 0,
                    "total_tokens": 2,
                    "source": "provider",
                    "created_at": moment,
                }
                for moment in [*moments, midnight]
            ],
        )
    one_day = await client.get(
        "/api/usage/summary?from=2026-03-29&to=2026-03-29", headers=auth(user)
    )
    assert one_day.status_code == 200, one_day.text
    assert [(r["day"], r["requests"]) for r in one_day.json()["rows"]] == [("2026-03-29", 2)]
    both = await client.get(
        "/api/admin/usage/summary?from=2026-03-29&to=2026-03-30&format=csv", headers=admin()
    )
    assert both.text.splitlines()[1:] == [
        '"2026-03-29",2,2,2,0,0,4,0',
        '"2026-03-30",1,1,1,0,0,2,0',
    ]


async def test_csv_is_answered_to_an_accept_that_prefers_it(client: httpx.AsyncClient) -> None:
    # the header was searched for the text "text/csv": a client that refuses CSV
    # (q=0) or prefers JSON got CSV all the same
    for accept, csv_wanted in (
        ("text/csv", True),
        ("text/csv, application/json;q=0.5", True),
        ("text/csv;q=0.8, */*;q=0.1", True),
        ("TEXT/CSV; charset=utf-8", True),
        ("text/csv;q=0", False),
        ("text/csv;q=0.000, application/json", False),
        ("application/json, text/csv;q=0.1", False),
        ("application/json;q=0.9, text/csv;q=0.5", False),
        ("*/*", False),
        ("text/csvx", False),
        ("text/csv;q=nonsense", False),
    ):
        response = await client.get(
            "/api/admin/usage/summary", headers={**admin(), "Accept": accept}
        )
        assert response.status_code == 200, (accept, response.text)
        is_csv = response.headers["content-type"].startswith("text/csv")
        assert is_csv == csv_wanted, accept


async def test_summary_refuses_bad_input_with_the_error_shape(client: httpx.AsyncClient) -> None:
    user = fresh("bad")
    queries = [
        "from=2026-13-01",
        "from=yesterday",
        "to=2026-02-30",
        "from=2026-05-02&to=2026-05-01",
        "from=2020-01-01&to=2026-01-01",
        "group_by=user",  # only the admin's summary groups by user
        "group_by=week",
        "format=xml",
        "from=20260501",
        # ISO week dates of ten characters, which date.fromisoformat reads (2025-12-29)
        "from=2026-W01-1",
        "to=2026W011%20%20",
    ]
    for query in queries:
        response = await client.get(f"/api/usage/summary?{query}", headers=auth(user))
        assert response.status_code == 400, (query, response.text)
        body = response.json()
        assert (body["error"], body["code"]) == (True, "INVALID_REQUEST"), query
    admin_bad = await client.get("/api/admin/usage/summary?group_by=nobody", headers=admin())
    assert admin_bad.status_code == 400
    forbidden = await client.get("/api/admin/usage/summary", headers=auth(user))
    assert forbidden.status_code == 403


async def test_summary_at_the_ends_of_the_calendar_is_400_or_empty(
    client: httpx.AsyncClient,
) -> None:
    # a day whose local midnight (or the midnight after it) is no moment in UTC was a 500
    user = fresh("calendar")
    for query in (
        "to=0001-01-01",
        "from=0001-01-01&to=0001-01-01",
        "from=9999-12-31&to=9999-12-31",
        "from=9999-12-30&to=9999-12-31",
    ):
        for path in ("/api/usage/summary", "/api/admin/usage/summary"):
            response = await client.get(f"{path}?{query}", headers=auth(user, admin=True))
            assert response.status_code == 400, (path, query, response.text)
            assert response.json()["code"] == "INVALID_REQUEST"
    # without `from`, the 30 days before `to` stop at the first day reported
    early = await client.get("/api/usage/summary?to=0001-01-10", headers=auth(user))
    assert early.status_code == 200, early.text
    assert (early.json()["from"], early.json()["rows"]) == ("0001-01-02", [])
    late = await client.get("/api/usage/summary?from=9999-12-30&to=9999-12-30", headers=auth(user))
    assert (late.status_code, late.json()["rows"]) == (200, [])


async def test_new_endpoints_are_described(client: httpx.AsyncClient) -> None:
    paths = (await client.get("/openapi.json")).json()["paths"]
    for path in (
        "/api/usage/summary",
        "/api/models",
        "/api/admin/plans",
        "/api/admin/users/{user_id}/plan",
        "/api/admin/usage/summary",
    ):
        assert path in paths, path


async def test_ledger_rows_are_what_the_totals_add_up_to(
    client: httpx.AsyncClient, server: RunningServer
) -> None:
    user = fresh("lee")
    await on_plan(client, user, "pro")
    for _ in range(2):
        chat = await new_chat(client, user, model="priced")
        await stream_message(client, chat, "Count me", token_for(user))
    state = await period_books(server.engine, user)
    assert balanced(state) and state.total > 0 and state.spend > 0
    async with server.engine.connect() as conn:
        costs = (
            (
                await conn.execute(
                    sa.select(messages.c.cost_micros)
                    .join(usage_events, usage_events.c.message_id == messages.c.message_id)
                    .where(usage_events.c.user_id == user)
                )
            )
            .scalars()
            .all()
        )
    assert sum(costs) == state.spend


async def test_metrics_count_refusals_by_reason_and_cost_by_model(
    client: httpx.AsyncClient,
) -> None:
    user = fresh("max")
    await on_plan(client, user, "tight")
    await client.put(f"/api/admin/users/{user}/limit", json={"token_limit": 1}, headers=admin())
    chat = await new_chat(client, user, model="priced")
    refused = await stream_message(client, chat, "No", token_for(user))
    assert refused.body["code"] == "TOKEN_BUDGET_EXCEEDED"
    paying = fresh("pay")
    paid = await stream_message(
        client, await new_chat(client, paying, model="priced"), "Yes", token_for(paying)
    )
    assert paid.last["usage"]["cost_micros"] > 0
    text = (await client.get("/metrics")).text
    assert 'chatmeter_refusals_total{reason="token"}' in text
    assert 'chatmeter_cost_billed_micros_total{model="priced"}' in text
