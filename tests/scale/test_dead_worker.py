"""A worker killed mid-reply (SIGKILL) while another serves the same database (issue 15).

Worker A is a `chatmeter serve` process, killed while it generates; worker B runs in the
test and outlives it. With Redis, B's sweeper settles A's reply from its log once A's
lease has run out: saved `interrupted` with exactly the logged text, counted, billed
once, and a reader following the reply on B sees it end. Without Redis, B releases the
reservation and nothing is billed (README: a worker dies)."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from decimal import Decimal
from pathlib import Path

import httpx
import sqlalchemy as sa

from chatmeter.db.tables import usage_events, user_usage
from chatmeter.metering.cost import Prices, cost_micros
from chatmeter.providers.base import Usage
from tests.conftest import TEST_SECRET, auth, make_settings, scripted, token_for
from tests.scale.test_workers import holder_pid
from tests.streaming.test_exchange import new_chat
from tests.streaming.test_resume import resume
from tests.support.db import books, chat_rows
from tests.support.process import chatmeter_process
from tests.support.redis import RedisServer
from tests.support.server import RunningServer, serve
from tests.support.sse import StreamResult, parse_events, stream_message
from tests.support.waiting import eventually

LEASE = 3.0
REPLY = " ".join(f"w{i}" for i in range(80))
TOML = f"""
default_model = "slow"
reservation_ttl_seconds = {LEASE}

[models.slow]
provider = "scripted"
reply = "{REPLY}"
chunks = 80
delay_ms = 100
usage = "none"
price_input = "1.5"
price_output = "6"
"""
SLOW = scripted(
    reply=REPLY,
    chunks=80,
    delay_ms=100,
    usage="none",
    price_input=Decimal("1.5"),
    price_output=Decimal("6"),
)
PRICES = Prices(input=Decimal("1.5"), cached_input=Decimal("1.5"), output=Decimal("6"))
PIECES_BEFORE_THE_KILL = 5


def survivor_settings(database_url: str, redis_url: str | None):  # type: ignore[no-untyped-def]
    return make_settings(
        database_url,
        models={"slow": SLOW},
        default_model="slow",
        reservation_ttl_seconds=LEASE,
        redis_url=redis_url,
    )


async def kill_mid_reply(
    a_url: str, b: RunningServer, database_url: str, user: str, *, follow: bool
) -> tuple[str, StreamResult, asyncio.Task[StreamResult] | None]:
    """Start a reply on A, read a few pieces (and, if `follow`, start a reader on B that
    has read them too), then SIGKILL A. Returns the chat, what A's client read, and B's
    reader, still following."""
    async with httpx.AsyncClient(base_url=a_url, timeout=30) as on_a:
        chat_id = await new_chat(on_a, user)
        client = await stream_message(
            on_a, chat_id, "go", token_for(user), stop_after=PIECES_BEFORE_THE_KILL
        )
    # the client left; with CHATMETER_ON_DISCONNECT=continue A goes on generating
    assert client.status == 200 and len(client.chunks) == PIECES_BEFORE_THE_KILL
    reader: asyncio.Task[StreamResult] | None = None
    if follow:
        # B follows the reply from Redis, and has read past what A's client read
        await _logged_in_redis(b, chat_id)
        followed = StreamResult(0, httpx.Headers())
        reader = asyncio.create_task(_follow(b, chat_id, user, followed))
        await eventually(lambda: len(followed.chunks) > PIECES_BEFORE_THE_KILL, within=30)
    pid = await holder_pid(database_url, chat_id)
    assert pid != os.getpid()
    os.kill(pid, signal.SIGKILL)
    return chat_id, client, reader


async def _logged_in_redis(b: RunningServer, chat_id: str) -> None:
    log = b.services.reply_log

    async def logged() -> bool:
        reply_id = await log.current(uuid.UUID(chat_id))
        return reply_id is not None and await log.holds(reply_id, uuid.UUID(chat_id))

    await eventually(logged, within=30)


async def _follow(b: RunningServer, chat_id: str, user: str, result: StreamResult) -> StreamResult:
    """`GET /api/chat/{chat_id}/stream` on B from the first event, to the end."""
    async with httpx.AsyncClient(base_url=b.url, timeout=60) as on_b:
        async with on_b.stream(
            "GET", f"/api/chat/{chat_id}/stream", headers=auth(user)
        ) as response:
            result.status = response.status_code
            async for _ in parse_events(response.aiter_lines(), result):
                pass
    return result


async def test_with_redis_a_killed_workers_reply_is_settled_from_its_log(
    database_url: str, redis_server: RedisServer, tmp_path: Path
) -> None:
    env = {"CHATMETER_REDIS_URL": redis_server.url}
    with chatmeter_process(
        database_url, TEST_SECRET, TOML, tmp_path, workers=1, extra_env=env
    ) as a_url:
        async with serve(survivor_settings(database_url, redis_server.url)) as b:
            chat_id, client, reader = await kill_mid_reply(
                a_url, b, database_url, "uma", follow=True
            )
            assert reader is not None
            # B's reader sees the reply end once B's sweeper settled it (lease 3 s)
            followed = await asyncio.wait_for(reader, 60)
            engine = b.engine
            rows = await chat_rows(engine, chat_id)
            assert [(r.role, r.status) for r in rows] == [
                ("user", "complete"),
                ("assistant", "interrupted"),
            ]
            saved = rows[1]
            assert followed.status == 200
            end = followed.last
            assert end["done"] is True and end["finish_reason"] == "interrupted"
            assert end["message_id"] == str(saved.message_id)
            # exactly the logged text: what any reader of the log got, A's client's first
            assert saved.content == followed.text
            assert saved.content.startswith(client.text)
            assert len(followed.chunks) > PIECES_BEFORE_THE_KILL  # A went on past the client
            assert saved.content != REPLY  # and died before its end
            assert followed.ids == list(range(1, len(followed.events) + 1))
            # counted from the text (the provider reports no usage), billed once
            assert saved.metering_source == "counted" == end["usage"]["source"]
            usage = Usage(saved.prompt_tokens, saved.completion_tokens)
            assert end["tokens_used"] == usage.total_tokens == saved.tokens_consumed
            assert saved.completion_tokens == len(followed.chunks)  # scripted: 1 a word
            assert end["usage"]["cost_micros"] == cost_micros(usage, PRICES) > 0
            state = await books(engine, "uma")
            assert state.ledger_rows == 1 and state.total == state.ledger == usage.total_tokens
            assert state.reserved == 0 and state.open_reservations == 0
            assert await _spend(engine, "uma") == (end["usage"]["cost_micros"],) * 2
            # a later resume replays the same events, the end among them
            async with httpx.AsyncClient(base_url=b.url, timeout=30) as on_b:
                again = await resume(on_b, chat_id, "uma")
                assert again.events == followed.events
                # the chat works again
                more = await stream_message(on_b, chat_id, "again", token_for("uma"))
            assert more.last["done"] is True
            state = await books(engine, "uma")
            assert state.ledger_rows == 2 and state.total == state.ledger
            assert state.reserved == 0


async def test_without_redis_a_killed_workers_reply_is_released_unbilled(
    database_url: str, tmp_path: Path
) -> None:
    with chatmeter_process(database_url, TEST_SECRET, TOML, tmp_path, workers=1) as a_url:
        async with serve(survivor_settings(database_url, None)) as b:
            chat_id, client, _ = await kill_mid_reply(a_url, b, database_url, "val", follow=False)
            assert client.text
            engine = b.engine

            async def released() -> bool:
                state = await books(engine, "val")
                return state.reserved == 0 and state.open_reservations == 0

            await eventually(released, within=30, every=0.2)
            rows = await chat_rows(engine, chat_id)
            assert [(r.role, r.content) for r in rows] == [("user", "go")]
            state = await books(engine, "val")
            assert state.total == state.ledger == 0 and state.ledger_rows == 0
            assert await _spend(engine, "val") == (0, 0)
            async with httpx.AsyncClient(base_url=b.url, timeout=30) as on_b:
                assert (await resume(on_b, chat_id, "val")).status == 204
                more = await stream_message(on_b, chat_id, "again", token_for("val"))
            assert more.last["done"] is True


async def _spend(engine, user: str) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    """The user's spend and the sum of the ledger's costs."""
    async with engine.connect() as conn:
        spend = (
            await conn.execute(
                sa.select(user_usage.c.spend_micros).where(user_usage.c.user_id == user)
            )
        ).scalar_one()
        ledger = (
            await conn.execute(
                sa.select(sa.func.coalesce(sa.func.sum(usage_events.c.cost_micros), 0)).where(
                    usage_events.c.user_id == user
                )
            )
        ).scalar_one()
    return int(spend), int(ledger)
