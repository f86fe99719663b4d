"""The usage endpoints over real HTTP (SPEC sections 4 and 6), on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from chatmeter.db.tables import usage_events, user_usage
from tests.conftest import auth, token_for
from tests.support.server import RunningServer
from tests.support.shared_server import fresh, shared_server_fixtures
from tests.support.sse import stream_message

DEFAULT_LIMIT = 12_345
backend, server, client = shared_server_fixtures(default_token_limit=DEFAULT_LIMIT)

USAGE_FIELDS = {
    "user_id",
    "total_tokens_used",
    "token_limit",
    "reserved_tokens",
    "tokens_remaining",
    # SPEC section 10
    "plan",
    "period",
    "period_start",
    "resets_at",
    "currency",
    "spend_micros",
    "spend_limit_micros",
    "requests_per_minute",
    "concurrent_replies",
}
# a user on the built-in default plan: no period, no spend limit, no rate limits
DEFAULT_PLAN_FIELDS = {
    "plan": "default",
    "period": "none",
    "period_start": None,
    "resets_at": None,
    "currency": "USD",
    "spend_micros": 0,
    "spend_limit_micros": None,
    "requests_per_minute": None,
    "concurrent_replies": None,
}
EVENT_FIELDS = {
    "event_id",
    "chat_id",
    "message_id",
    "model",
    "prompt_tokens",
    "completion_tokens",
    "thinking_tokens",
    "cached_tokens",
    "total_tokens",
    "source",
    "cost_micros",
    "created_at",
}


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "code", "message"}, body
    assert (body["error"], body["code"]) == (True, code)
    assert body["message"].strip()


def admin() -> dict[str, str]:
    return auth(fresh("admin"), admin=True)


async def usage_row(server: RunningServer, user: str) -> Any:
    async with server.engine.connect() as conn:
        query = sa.select(user_usage).where(user_usage.c.user_id == user)
        return (await conn.execute(query)).one_or_none()


async def exchange(client: httpx.AsyncClient, user: str, text: str = "Hi!") -> dict[str, Any]:
    created = await client.post("/api/chat", json={}, headers=auth(user))
    assert created.status_code == 201, created.text
    result = await stream_message(client, created.json()["chat_id"], text, token_for(user))
    assert result.status == 200, result.body
    end = result.last
    assert end.get("done") is True, result.events
    return {**end, "chat_id": created.json()["chat_id"]}


async def insert_events(
    server: RunningServer, user: str, count: int, moments: list[datetime]
) -> list[str]:
    values = [
        {
            "event_id": uuid.uuid4(),
            "user_id": user,
            "chat_id": uuid.uuid4(),
            "message_id": uuid.uuid4(),
            "model": "scripted",
            "prompt_tokens": n,
            "completion_tokens": 1,
            "thinking_tokens": 0,
            "cached_tokens": 0,
            "total_tokens": n + 1,
            "source": "provider",
            "created_at": moments[n],
        }
        for n in range(count)
    ]
    async with server.engine.begin() as conn:
        await conn.execute(usage_events.insert(), values)
    return [str(v["event_id"]) for v in values]


# -- the caller's usage ----------------------------------------------------------------


async def test_first_look_creates_the_row_with_the_default_limit(
    client: httpx.AsyncClient, server: RunningServer
) -> None:
    alice = fresh("alice")
    assert await usage_row(server, alice) is None
    response = await client.get("/api/usage", headers=auth(alice))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {
        "user_id": alice,
        "total_tokens_used": 0,
        "token_limit": DEFAULT_LIMIT,
        "reserved_tokens": 0,
        "tokens_remaining": DEFAULT_LIMIT,
        **DEFAULT_PLAN_FIELDS,
    }
    row = await usage_row(server, alice)
    assert (row.total_tokens_used, row.token_limit, row.reserved_tokens) == (0, DEFAULT_LIMIT, 0)
    again = await client.get("/api/usage", headers=auth(alice))
    assert again.json() == response.json()


async def test_usage_after_an_exchange(client: httpx.AsyncClient, server: RunningServer) -> None:
    alice = fresh("alice")
    end = await exchange(client, alice)
    usage = (await client.get("/api/usage", headers=auth(alice))).json()
    assert set(usage) == USAGE_FIELDS
    assert usage["total_tokens_used"] == end["tokens_used"] > 0
    assert usage["reserved_tokens"] == 0
    assert usage["tokens_remaining"] == DEFAULT_LIMIT - end["tokens_used"]
    row = await usage_row(server, alice)
    assert row.total_tokens_used == end["tokens_used"]


async def test_concurrent_first_looks_and_limit_changes(
    client: httpx.AsyncClient, server: RunningServer
) -> None:
    """Many users seen for the first time at once, the same new user many times at once,
    and admin changes in between: every answer is 200 and there is one row per user."""
    same = fresh("same")
    strangers = [fresh("stranger") for _ in range(15)]
    limited = [fresh("limited") for _ in range(10)]
    responses = await asyncio.gather(
        *(client.get("/api/usage", headers=auth(user)) for user in strangers),
        *(client.get("/api/usage", headers=auth(same)) for _ in range(10)),
        *(
            client.put(f"/api/admin/users/{user}/limit", json={"token_limit": 50}, headers=admin())
            for user in limited
        ),
        *(client.get(f"/api/admin/users/{user}/usage", headers=admin()) for user in strangers),
    )
    assert [r.status_code for r in responses] == [200] * 50, [r.text for r in responses]
    assert {r.json()["token_limit"] for r in responses[:25]} == {DEFAULT_LIMIT}
    assert {r.json()["token_limit"] for r in responses[25:35]} == {50}
    for user in [same, *strangers, *limited]:
        assert await usage_row(server, user) is not None
    async with server.engine.connect() as conn:
        query = sa.select(sa.func.count()).where(user_usage.c.user_id == same)
        assert (await conn.execute(query)).scalar_one() == 1


# -- the caller's ledger ---------------------------------------------------------------


async def test_events_empty(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/usage/events", headers=auth(fresh("alice")))
    assert response.status_code == 200, response.text
    assert response.json() == {"events": [], "next": None}


async def test_events_of_real_exchanges_newest_first_and_paged(
    client: httpx.AsyncClient,
) -> None:
    alice, bob = fresh("alice"), fresh("bob")
    ends = [await exchange(client, alice, f"message {n}") for n in range(3)]
    await exchange(client, bob)

    everything = (await client.get("/api/usage/events", headers=auth(alice))).json()
    assert everything["next"] is None
    events = everything["events"]
    assert [e["message_id"] for e in events] == [e["message_id"] for e in reversed(ends)]
    for event, end in zip(events, reversed(ends), strict=True):
        assert set(event) == EVENT_FIELDS
        assert event["chat_id"] == end["chat_id"]
        assert event["model"] == "scripted"
        assert event["source"] == end["usage"]["source"] == "provider"
        assert event["total_tokens"] == end["tokens_used"]
        assert event["prompt_tokens"] == end["usage"]["prompt_tokens"]
        assert event["completion_tokens"] == end["usage"]["completion_tokens"]
        assert (event["thinking_tokens"], event["cached_tokens"]) == (0, 0)
        uuid.UUID(event["event_id"])
        assert datetime.fromisoformat(event["created_at"]).tzinfo is not None
    usage = (await client.get("/api/usage", headers=auth(alice))).json()
    assert usage["total_tokens_used"] == sum(e["total_tokens"] for e in events)

    first = (await client.get("/api/usage/events?limit=2", headers=auth(alice))).json()
    assert [e["event_id"] for e in first["events"]] == [e["event_id"] for e in events[:2]]
    assert first["next"]
    second = (
        await client.get(
            "/api/usage/events", params={"limit": 2, "before": first["next"]}, headers=auth(alice)
        )
    ).json()
    assert [e["event_id"] for e in second["events"]] == [events[2]["event_id"]]
    assert second["next"] is None


async def page_through(client: httpx.AsyncClient, user: str, limit: int) -> list[str]:
    seen: list[str] = []
    cursor: str | None = None
    for _ in range(100):
        params: dict[str, Any] = {"limit": limit}
        if cursor:
            params["before"] = cursor
        response = await client.get("/api/usage/events", params=params, headers=auth(user))
        assert response.status_code == 200, response.text
        page = response.json()
        assert len(page["events"]) <= limit
        seen += [e["event_id"] for e in page["events"]]
        cursor = page["next"]
        if cursor is None:
            return seen
        assert len(page["events"]) == limit
    raise AssertionError("paging never ended")


async def test_events_pages_have_no_duplicates_or_gaps(
    client: httpx.AsyncClient, server: RunningServer
) -> None:
    alice = fresh("alice")
    start = datetime(2031, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
    moments = [start + timedelta(milliseconds=n) for n in range(11)]
    ids = await insert_events(server, alice, 11, moments)
    for limit in (1, 3, 5, 11, 500):
        assert await page_through(client, alice, limit) == list(reversed(ids)), limit


async def test_events_with_equal_timestamps_page_by_id(
    client: httpx.AsyncClient, server: RunningServer
) -> None:
    alice = fresh("alice")
    same = datetime(2031, 1, 1, tzinfo=UTC)
    ids = await insert_events(server, alice, 7, [same] * 7)
    seen = await page_through(client, alice, 3)
    assert len(seen) == len(set(seen)) == 7
    assert set(seen) == set(ids)
    assert seen == sorted(ids, key=uuid.UUID, reverse=True)


@pytest.mark.parametrize(
    "query", ["limit=0", "limit=501", "limit=x", "before=garbage", "before=" + "A" * 201]
)
async def test_bad_event_queries_are_400(client: httpx.AsyncClient, query: str) -> None:
    response = await client.get(f"/api/usage/events?{query}", headers=auth(fresh("alice")))
    assert_error(response, 400, "INVALID_REQUEST")


# -- admin ---------------------------------------------------------------------------


async def test_admin_sets_a_limit_the_user_sees(
    client: httpx.AsyncClient, server: RunningServer
) -> None:
    alice = fresh("alice")
    response = await client.put(
        f"/api/admin/users/{alice}/limit", json={"token_limit": 500}, headers=admin()
    )
    assert response.status_code == 200, response.text
    assert response.json() == {
        "user_id": alice,
        "total_tokens_used": 0,
        "token_limit": 500,
        "reserved_tokens": 0,
        "tokens_remaining": 500,
        **DEFAULT_PLAN_FIELDS,
    }
    assert (await usage_row(server, alice)).token_limit == 500
    mine = (await client.get("/api/usage", headers=auth(alice))).json()
    assert (mine["token_limit"], mine["tokens_remaining"]) == (500, 500)
    seen = (await client.get(f"/api/admin/users/{alice}/usage", headers=admin())).json()
    assert seen == mine


async def test_limit_change_keeps_what_was_used(client: httpx.AsyncClient) -> None:
    alice = fresh("alice")
    used = (await exchange(client, alice))["tokens_used"]
    raised = await client.put(
        f"/api/admin/users/{alice}/limit", json={"token_limit": 1_000_000}, headers=admin()
    )
    assert raised.json()["total_tokens_used"] == used
    assert raised.json()["tokens_remaining"] == 1_000_000 - used
    lowered = await client.put(
        f"/api/admin/users/{alice}/limit", json={"token_limit": used - 1}, headers=admin()
    )
    assert lowered.status_code == 200, lowered.text
    assert lowered.json()["token_limit"] == used - 1
    assert lowered.json()["tokens_remaining"] == 0  # never negative
    mine = (await client.get("/api/usage", headers=auth(alice))).json()
    assert (mine["total_tokens_used"], mine["tokens_remaining"]) == (used, 0)


async def test_zero_limit_refuses_the_next_message(client: httpx.AsyncClient) -> None:
    alice = fresh("alice")
    chat = (await client.post("/api/chat", json={}, headers=auth(alice))).json()["chat_id"]
    put = await client.put(
        f"/api/admin/users/{alice}/limit", json={"token_limit": 0}, headers=admin()
    )
    assert put.json()["tokens_remaining"] == 0
    response = await client.post(
        f"/api/chat/{chat}/message", json={"message": "hi"}, headers=auth(alice)
    )
    assert_error(response, 403, "TOKEN_BUDGET_EXCEEDED")
    messages = (await client.get(f"/api/chat/{chat}", headers=auth(alice))).json()["messages"]
    assert messages == []


async def test_largest_limit_is_accepted(client: httpx.AsyncClient) -> None:
    alice = fresh("alice")
    response = await client.put(
        f"/api/admin/users/{alice}/limit", json={"token_limit": 2**62}, headers=admin()
    )
    assert response.status_code == 200, response.text
    assert response.json()["tokens_remaining"] == 2**62


@pytest.mark.parametrize(
    "body",
    [
        {"token_limit": -1},
        {"token_limit": "500"},
        {"token_limit": 1.5},
        {"token_limit": 500.0},
        {"token_limit": True},
        {"token_limit": None},
        {"token_limit": [500]},
        {"token_limit": 2**62 + 1},
        {"token_limit": 10**30},
        {},
        {"limit": 500},
        {"token_limit": 500, "extra": 1},
        {"token_limit": 500, "total_tokens_used": 0},
        [500],
        500,
        None,
    ],
)
async def test_bad_limit_bodies_are_400(
    client: httpx.AsyncClient, server: RunningServer, body: Any
) -> None:
    alice = fresh("alice")
    await client.put(f"/api/admin/users/{alice}/limit", json={"token_limit": 321}, headers=admin())
    response = await client.put(f"/api/admin/users/{alice}/limit", json=body, headers=admin())
    assert_error(response, 400, "INVALID_REQUEST")
    assert (await usage_row(server, alice)).token_limit == 321


@pytest.mark.parametrize("raw", [b"", b"{", b"token_limit=5", b'{"token_limit": 5'])
async def test_malformed_limit_body_is_400(
    client: httpx.AsyncClient, server: RunningServer, raw: bytes
) -> None:
    alice = fresh("alice")
    headers = {**admin(), "Content-Type": "application/json"}
    response = await client.put(f"/api/admin/users/{alice}/limit", content=raw, headers=headers)
    assert_error(response, 400, "INVALID_REQUEST")
    assert await usage_row(server, alice) is None


async def test_admin_reads_a_new_users_usage(
    client: httpx.AsyncClient, server: RunningServer
) -> None:
    alice = fresh("alice")
    response = await client.get(f"/api/admin/users/{alice}/usage", headers=admin())
    assert response.status_code == 200, response.text
    assert response.json() == {
        "user_id": alice,
        "total_tokens_used": 0,
        "token_limit": DEFAULT_LIMIT,
        "reserved_tokens": 0,
        "tokens_remaining": DEFAULT_LIMIT,
        **DEFAULT_PLAN_FIELDS,
    }


async def test_admin_user_ids_in_the_path(client: httpx.AsyncClient) -> None:
    email = f"{fresh('someone')}@example.com"
    response = await client.put(
        f"/api/admin/users/{email.replace('@', '%40')}/limit",
        json={"token_limit": 9},
        headers=admin(),
    )
    assert response.status_code == 200, response.text
    assert response.json()["user_id"] == email
    mine = await client.get("/api/usage", headers=auth(email))
    assert mine.json()["token_limit"] == 9

    longest = fresh("x") + "y" * (255 - len(fresh("x")))
    ok = await client.get(f"/api/admin/users/{longest}/usage", headers=admin())
    assert ok.status_code == 200, ok.text
    too_long = longest + "z"
    for response in (
        await client.get(f"/api/admin/users/{too_long}/usage", headers=admin()),
        await client.put(
            f"/api/admin/users/{too_long}/limit", json={"token_limit": 1}, headers=admin()
        ),
        await client.get("/api/admin/users/%20/usage", headers=admin()),
    ):
        assert_error(response, 400, "INVALID_REQUEST")


async def test_non_admin_cannot_change_limits(
    client: httpx.AsyncClient, server: RunningServer
) -> None:
    alice = fresh("alice")
    response = await client.put(
        f"/api/admin/users/{alice}/limit", json={"token_limit": 10**9}, headers=auth(alice)
    )
    assert_error(response, 403, "FORBIDDEN")
    assert await usage_row(server, alice) is None
    # 401 and 403 come before the body is looked at
    bad = await client.put(f"/api/admin/users/{alice}/limit", content=b"{", headers=auth(alice))
    assert_error(bad, 403, "FORBIDDEN")
    anonymous = await client.put(f"/api/admin/users/{alice}/limit", content=b"{")
    assert_error(anonymous, 401, "UNAUTHORIZED")
