"""Budgets hold under concurrency: many simultaneous streams of one user against a small
limit never spend past it, and the books balance afterwards (SPEC section 6)."""

from __future__ import annotations

import asyncio

import httpx

from chatmeter.metering.counting import counted_prompt
from chatmeter.providers.scripted import scripted_count
from tests.conftest import auth, make_settings, scripted, token_for
from tests.streaming.test_exchange import new_chat
from tests.support.db import Books, books
from tests.support.server import serve
from tests.support.sse import stream_message

REPLY = "A reply of some length so that each exchange costs a fair number of tokens."


async def test_concurrent_streams_never_pass_the_limit(database_url: str) -> None:
    model = scripted(reply=REPLY, chunks=6, delay_ms=15, max_output_tokens=40)
    settings = make_settings(database_url, models={"m": model}, default_token_limit=900)
    async with serve(settings) as server:
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as client:
            chats = [await new_chat(client, "heidi", model="m") for _ in range(36)]
            results = await asyncio.gather(
                *(
                    stream_message(client, chat, f"message {i}", token_for("heidi"))
                    for i, chat in enumerate(chats)
                )
            )
            usage = (await client.get("/api/usage", headers=auth("heidi"))).json()

    served = [r for r in results if r.status == 200]
    refused = [r for r in results if r.status != 200]
    assert served and refused, "the limit should bind: some served, some refused"
    assert all(r.status == 403 and r.body["code"] == "TOKEN_BUDGET_EXCEEDED" for r in refused)
    assert all(r.last.get("done") is True for r in served)
    billed = sum(r.last["tokens_used"] for r in served)

    state = await books_after(settings.database_url, "heidi")
    assert state.total == billed == usage["total_tokens_used"]
    assert state.total <= state.limit == 900
    assert state.ledger == state.total and state.ledger_rows == len(served)
    assert state.reserved == 0 and state.open_reservations == 0
    assert usage["reserved_tokens"] == 0


async def books_after(database_url: str, user: str) -> Books:
    from chatmeter.db.engine import make_engine

    engine = make_engine(database_url)
    try:
        return await books(engine, user)
    finally:
        await engine.dispose()


async def test_output_cap_is_lowered_to_what_the_budget_allows(database_url: str) -> None:
    long_reply = "x" * 400  # 100 scripted tokens
    model = scripted(reply=long_reply, chunks=20, max_output_tokens=1000)
    settings = make_settings(database_url, models={"m": model}, default_token_limit=10_000)
    async with serve(settings) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            admin = auth("root", admin=True)
            chat = await new_chat(client, "ivan", model="m")
            prompt_bound = (await client.get("/api/usage", headers=auth("ivan"))).json()
            assert prompt_bound["token_limit"] == 10_000
            # leave room for the prompt and 20 output tokens only: the scripted model
            # counts locally, so the prompt is reserved by its count (`exchange.py`)
            system = settings.system_prompt_for("m")
            prompt = counted_prompt(scripted_count(system) + scripted_count("hi"), 1)
            limit = await client.put(
                "/api/admin/users/ivan/limit", json={"token_limit": prompt + 20}, headers=admin
            )
            assert limit.status_code == 200
            result = await stream_message(client, chat, "hi", token_for("ivan"))
            assert result.status == 200
            end = result.last
            assert end["finish_reason"] == "length"
            assert end["usage"]["completion_tokens"] <= 20
            state = await books(server.engine, "ivan")
            assert state.total <= state.limit
            assert state.reserved == 0
            # a budget too small for another prompt, even counted exactly (what is left of
            # the one above may hold the count: `exchange.open_exchange` asks again with
            # it): refused up front, nothing saved
            limit = await client.put(
                "/api/admin/users/ivan/limit", json={"token_limit": state.total + 20}, headers=admin
            )
            assert limit.status_code == 200
            again = await stream_message(client, chat, "hi", token_for("ivan"))
            assert again.status == 403 and again.body["code"] == "TOKEN_BUDGET_EXCEEDED"
            after = await books(server.engine, "ivan")
            assert after.total == state.total and after.reserved == 0
