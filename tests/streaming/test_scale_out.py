"""Replies and stops across workers (SPEC section 11): two chatmeter servers share one
database, and Redis when configured. A reply generated on one is resumed from the
other; a stop posted to one ends the reply the other generates; Redis that goes away
mid-reply costs the resume, never the reply or its settlement."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import text

from chatmeter.db.rows import as_datetime
from tests.conftest import auth, make_settings, scripted, token_for
from tests.streaming.test_exchange import new_chat
from tests.streaming.test_resume import resume
from tests.support.db import books, chat_rows, open_reservations
from tests.support.redis import RedisServer
from tests.support.server import RunningServer, serve
from tests.support.sse import StreamResult, parse_events, stream_message
from tests.support.waiting import eventually

SLOW = scripted(reply=" ".join(f"word{i}" for i in range(40)), chunks=40, delay_ms=40)


@asynccontextmanager
async def two_workers(database_url: str, **overrides: Any) -> AsyncIterator[list[RunningServer]]:
    async with AsyncExitStack() as stack:
        servers = []
        for _ in range(2):
            settings = make_settings(database_url, models={"slow": SLOW}, **overrides)
            servers.append(await stack.enter_async_context(serve(settings)))
        yield servers


async def test_a_reply_is_resumed_from_another_worker(
    database_url: str, redis_server: RedisServer
) -> None:
    async with two_workers(database_url, redis_url=redis_server.url) as (a, b):
        async with httpx.AsyncClient(base_url=a.url, timeout=30) as on_a:
            async with httpx.AsyncClient(base_url=b.url, timeout=30) as on_b:
                chat_id = await new_chat(on_a, "ann", model="slow")
                first = await stream_message(on_a, chat_id, "go", token_for("ann"), stop_after=3)
                # live from B while A generates: the missing events, original ids, the end
                rest = await resume(on_b, chat_id, "ann", last_event_id_header="4")
                assert rest.status == 200
                assert rest.ids == list(range(5, 5 + len(rest.events)))
                assert rest.last["done"] is True, (first.ids, rest.ids, rest.events[-2:])
                assert first.text + rest.text == SLOW.reply
                # replay of the finished reply from B: byte for byte the same events
                again = await resume(on_b, chat_id, "ann")
                assert again.events == first.events + rest.events
                assert again.ids == first.ids + rest.ids
                state = await books(a.engine, "ann")
                assert state.total == state.ledger == rest.last["tokens_used"]
                assert state.reserved == 0


async def test_without_redis_a_resume_on_another_worker_finds_nothing(
    database_url: str,
) -> None:
    """Without Redis a reply lives in the memory of its worker (README: scale-out)."""
    async with two_workers(database_url) as (a, b):
        async with httpx.AsyncClient(base_url=a.url, timeout=30) as on_a:
            async with httpx.AsyncClient(base_url=b.url, timeout=30) as on_b:
                chat_id = await new_chat(on_a, "ben", model="slow")
                done = await stream_message(on_a, chat_id, "go", token_for("ben"))
                assert done.last["done"] is True
                assert (await resume(on_a, chat_id, "ben")).status == 200
                assert (await resume(on_b, chat_id, "ben")).status == 204


async def stop_from_the_other_worker(a: RunningServer, b: RunningServer, user: str) -> None:
    async with httpx.AsyncClient(base_url=a.url, timeout=30) as on_a:
        async with httpx.AsyncClient(base_url=b.url, timeout=30) as on_b:
            chat_id = await new_chat(on_a, user, model="slow")
            result = StreamResult(0, httpx.Headers())
            async with on_a.stream(
                "POST", f"/api/chat/{chat_id}/message", json={"message": "go"}, headers=auth(user)
            ) as response:
                stopped = False
                async for event in parse_events(response.aiter_lines(), result):
                    if not stopped and len(result.chunks) == 2:
                        stop = await on_b.post(f"/api/chat/{chat_id}/stop", headers=auth(user))
                        assert stop.status_code == 202
                        stopped = True
                    if event.get("done") or event.get("error"):
                        break
            assert result.last["finish_reason"] == "stopped"
            assert len(result.chunks) < 40
            rows = await chat_rows(a.engine, chat_id)
            assert rows[1].status == "stopped" and rows[1].content == result.text
            assert await open_reservations(a.engine, user) == 0


async def test_a_stop_reaches_the_other_worker_through_redis(
    database_url: str, redis_server: RedisServer
) -> None:
    async with two_workers(database_url, redis_url=redis_server.url) as (a, b):
        await stop_from_the_other_worker(a, b, "cat")


async def test_a_stop_reaches_the_other_worker_without_redis(database_url: str) -> None:
    """PostgreSQL: LISTEN/NOTIFY; SQLite: the poll of the flag."""
    async with two_workers(database_url) as (a, b):
        await stop_from_the_other_worker(a, b, "cid")


async def test_redis_gone_mid_reply_loses_neither_the_reply_nor_its_bill(
    database_url: str, redis_server: RedisServer
) -> None:
    async with two_workers(database_url, redis_url=redis_server.url) as (a, _b):
        async with httpx.AsyncClient(base_url=a.url, timeout=30) as on_a:
            chat_id = await new_chat(on_a, "dot", model="slow")
            reading = asyncio.create_task(stream_message(on_a, chat_id, "go", token_for("dot")))

            async def streaming() -> bool:
                return await open_reservations(a.engine, "dot") == 1

            await eventually(streaming)
            redis_server.stop()
            try:
                result = await reading
            finally:
                redis_server.start()
            assert result.last["done"] is True and result.text == SLOW.reply
            rows = await chat_rows(a.engine, chat_id)
            assert rows[1].status == "complete" and rows[1].content == SLOW.reply
            state = await books(a.engine, "dot")
            assert state.total == state.ledger == result.last["tokens_used"]
            assert state.reserved == 0


THINKER = scripted(reply="a long thought, then this", chunks=2, delay_ms=10_000)


async def lease_end(engine: Any, user_id: str) -> datetime | None:
    async with engine.connect() as conn:
        rows = (
            await conn.execute(
                text("SELECT expires_at FROM reservations WHERE user_id = :u"), {"u": user_id}
            )
        ).all()
    return as_datetime(rows[0][0]) if rows else None


async def test_a_reply_silent_longer_than_its_redis_ttl_is_still_resumable(
    database_url: str, redis_server: RedisServer
) -> None:
    """A model that thinks before it writes (Gemini's thoughts, a reasoning model) can be
    silent for up to the provider idle timeout (60 s by default). The reply's Redis keys
    were given a TTL of three leases, renewed only when an event was written: with a
    short lease they expired while the reply streamed, and a resume from another worker
    answered 204 (SPEC 11: resumable while it streams); had its worker died then, the
    sweeper found no log and released the reply unbilled."""
    overrides: dict[str, Any] = {"redis_url": redis_server.url, "reservation_ttl_seconds": 2}
    async with AsyncExitStack() as stack:
        a, b = [
            await stack.enter_async_context(
                serve(make_settings(database_url, models={"thinker": THINKER}, **overrides))
            )
            for _ in range(2)
        ]
        async with httpx.AsyncClient(base_url=a.url, timeout=60) as on_a:
            async with httpx.AsyncClient(base_url=b.url, timeout=60) as on_b:
                chat_id = await new_chat(on_a, "tia", model="thinker")
                reading = asyncio.create_task(stream_message(on_a, chat_id, "go", token_for("tia")))

                async def opened() -> bool:
                    return await lease_end(a.engine, "tia") is not None

                await eventually(opened)
                first_lease = await lease_end(a.engine, "tia")
                assert first_lease is not None

                async def silent_past_three_leases() -> bool:
                    # the reply is alive (its lease renewed) and has written nothing
                    # for more than three leases: the keys' first TTL is over
                    now = await lease_end(a.engine, "tia")
                    return now is not None and now > first_lease + timedelta(seconds=6.5)

                await eventually(silent_past_three_leases, within=30)
                assert not reading.done()
                resumed = await resume(on_b, chat_id, "tia")
                original = await reading
                assert resumed.status == 200, "a streaming reply answered 204 on another worker"
                assert resumed.last["done"] is True
                assert resumed.events == original.events
