"""A reply whose process died mid-reply, settled from its Redis log by another worker's
sweeper (`chatmeter/streaming/orphans.py`), on both databases with a real redis-server.

Worker A opens an exchange and logs its first pieces, as its job would, then does
nothing more (a process that vanished: no settlement, no lease renewal); worker B, which
never held the reply, settles it once its lease has run out. The killed-process version
of the same story is tests/scale/test_dead_worker.py."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import timedelta
from typing import Any

import httpx
import orjson
import redis.asyncio as aioredis
import sqlalchemy as sa

from chatmeter.auth.tokens import Principal
from chatmeter.db.tables import reservations, utcnow
from chatmeter.metering.reservations import release_expired
from chatmeter.metering.settlement import settle_with_retries
from chatmeter.streaming.exchange import Exchange, open_exchange
from chatmeter.streaming.jobs import begin_reply, record_of
from chatmeter.streaming.log import MemoryLog, ReplyRecord
from chatmeter.streaming.orphans import OrphanSettler, prompt_of
from chatmeter.streaming.redis_log import RedisLog, stream_key
from tests.conftest import make_settings, scripted, token_for
from tests.streaming.test_exchange import new_chat
from tests.streaming.test_resume import resume
from tests.support.db import books, chat_rows, ledger_row
from tests.support.redis import RedisServer
from tests.support.server import RunningServer, serve
from tests.support.sse import stream_message
from tests.support.waiting import eventually

PIECES = ["Once ", "upon ", "a ", "time"]
MODEL = scripted(reply="one two three four five six", chunks=3)


@asynccontextmanager
async def two_workers(
    database_url: str, redis_url: str | None
) -> AsyncIterator[list[RunningServer]]:
    async with AsyncExitStack() as stack:
        servers = []
        for _ in range(2):
            settings = make_settings(database_url, models={"scripted": MODEL}, redis_url=redis_url)
            servers.append(await stack.enter_async_context(serve(settings)))
        yield servers


async def abandoned_reply(a: RunningServer, user: str, pieces: list[str]) -> Exchange:
    """Open a reply on A and log `pieces`, then leave it as a dead process would."""
    async with httpx.AsyncClient(base_url=a.url, timeout=30) as client:
        chat_id = await new_chat(client, user)
        # an earlier exchange: the prompt of the abandoned one has history
        earlier = await stream_message(client, chat_id, "hello", token_for(user))
        assert earlier.last["done"] is True
    services = a.services
    exchange = await open_exchange(services, Principal(user), uuid.UUID(chat_id), "tell me")
    await begin_reply(exchange, services.reply_log)
    for piece in pieces:
        await services.reply_log.append(exchange.message_id, {"chunk": piece, "done": False})
    return exchange


async def logged(server: RunningServer, exchange: Exchange, text: str) -> None:
    """Wait until Redis holds the pieces (they are written in the background)."""
    log = server.services.reply_log
    assert isinstance(log, RedisLog)
    assert exchange.chat_id is not None

    async def written() -> bool:
        left = await log.left_behind(exchange.chat_id)  # type: ignore[arg-type]
        return left is not None and left.text == text

    await eventually(written)


async def expire_lease(server: RunningServer, exchange: Exchange) -> None:
    async with server.engine.begin() as conn:
        await conn.execute(
            sa.update(reservations)
            .where(reservations.c.reservation_id == exchange.reservation.reservation_id)
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )


def settler(server: RunningServer) -> OrphanSettler:
    orphans = server.services.replies.orphans
    assert isinstance(orphans, OrphanSettler)
    return orphans


async def test_the_sweeper_settles_a_dead_reply_from_its_log(
    database_url: str, redis_server: RedisServer
) -> None:
    async with two_workers(database_url, redis_server.url) as (a, b):
        exchange = await abandoned_reply(a, "olga", PIECES)
        text = "".join(PIECES)
        await logged(b, exchange, text)
        # a live lease: nothing to settle
        assert await settler(b).settle_expired(utcnow()) == 0
        await expire_lease(a, exchange)
        assert await settler(b).settle_expired(utcnow()) == 1

        chat_id = str(exchange.chat_id)
        rows = await chat_rows(b.engine, chat_id)
        reply = rows[-1]
        assert (reply.message_id, reply.role, reply.status) == (
            exchange.message_id,
            "assistant",
            "interrupted",
        )
        assert reply.content == text and reply.finish_reason == "interrupted"
        # counted exactly as an interrupted reply the provider gave no usage for
        provider = await a.services.providers.get("scripted")
        expected = await a.services.counter.meter(provider, exchange.request, text, None)
        assert expected.source == "counted"
        assert reply.metering_source == "counted"
        assert reply.prompt_tokens == expected.usage.prompt_tokens
        assert reply.completion_tokens == expected.usage.completion_tokens
        ledger = await ledger_row(b.engine, str(exchange.message_id))
        assert ledger is not None and ledger.total_tokens == expected.usage.total_tokens
        state = await books(b.engine, "olga")
        assert state.ledger_rows == 2  # the earlier exchange and this one
        assert state.total == state.ledger
        assert state.reserved == 0 and state.open_reservations == 0

        # a reader on either worker sees the logged pieces, then the end
        async with httpx.AsyncClient(base_url=b.url, timeout=30) as on_b:
            seen = await resume(on_b, chat_id, "olga", last_event_id="1")
        assert seen.status == 200
        assert seen.ids == list(range(2, 2 + len(PIECES) + 1))
        assert seen.text == text
        end = seen.last
        assert end["done"] is True and end["finish_reason"] == "interrupted"
        assert end["tokens_used"] == expected.usage.total_tokens
        assert end["message_id"] == str(exchange.message_id)
        assert end["user_message_id"] == str(exchange.user_message_id)
        assert end["usage"]["source"] == "counted"

        # settled once: a later sweep finds nothing; A, had it been only stalled, settling
        # the reply itself writes nothing (the message id is the settlement's key)
        assert await settler(a).settle_expired(utcnow()) == 0
        late = exchange._settlement(text + " and more", "complete", "stop", expected)
        await settle_with_retries(a.services.transactor, late, within_seconds=10)
        assert await books(b.engine, "olga") == state
        assert (await chat_rows(b.engine, chat_id))[-1].content == text
        async with httpx.AsyncClient(base_url=a.url, timeout=30) as on_a:
            again = await stream_message(on_a, chat_id, "again", token_for("olga"))
        assert again.last["done"] is True
        state = await books(b.engine, "olga")
        assert state.ledger_rows == 3 and state.total == state.ledger and state.reserved == 0


async def test_two_sweepers_racing_bill_once(database_url: str, redis_server: RedisServer) -> None:
    async with two_workers(database_url, redis_server.url) as (a, b):
        exchanges = [await abandoned_reply(a, "pia", PIECES[: n + 1]) for n in range(3)]
        for n, exchange in enumerate(exchanges):
            await logged(b, exchange, "".join(PIECES[: n + 1]))
            await expire_lease(a, exchange)
        now = utcnow()
        counts = await asyncio.gather(
            settler(a).settle_expired(now),
            settler(b).settle_expired(now),
            settler(b).settle_expired(now),
        )
        assert sum(counts) == 3, counts
        state = await books(b.engine, "pia")
        assert state.ledger_rows == 3 + 3  # three earlier exchanges, three settled
        assert state.total == state.ledger
        assert state.reserved == 0 and state.open_reservations == 0
        redis: Any = b.services.reply_log._redis  # type: ignore[attr-defined]
        for n, exchange in enumerate(exchanges):
            rows = await chat_rows(b.engine, str(exchange.chat_id))
            assert [r.status for r in rows] == ["complete", "complete", "complete", "interrupted"]
            assert rows[-1].content == "".join(PIECES[: n + 1])
            # one end event in the log
            entries = await redis.xrange(stream_key(exchange.message_id), min="-", max="+")
            assert [b"e" in fields for _, fields in entries].count(True) == 1


async def test_a_reply_that_ended_is_left_to_its_settlement(
    database_url: str, redis_server: RedisServer
) -> None:
    """The end event is logged only after settlement ran; a reservation still there then
    is the outbox's (the database was away) and is released as without Redis."""
    async with two_workers(database_url, redis_server.url) as (a, b):
        exchange = await abandoned_reply(a, "quin", PIECES)
        await a.services.reply_log.finish(exchange.message_id)
        log = b.services.reply_log
        assert isinstance(log, RedisLog) and exchange.chat_id is not None

        async def ended() -> bool:
            return await resume_status(b, exchange) == "finished"

        await eventually(ended)
        assert await log.left_behind(exchange.chat_id) is None
        await expire_lease(a, exchange)
        assert await settler(b).settle_expired(utcnow()) == 0
        assert await b.services.transactor.run(release_expired, utcnow()) == 1
        rows = await chat_rows(b.engine, str(exchange.chat_id))
        assert rows[-1].role == "user"
        state = await books(b.engine, "quin")
        assert state.ledger_rows == 1 and state.total == state.ledger and state.reserved == 0


async def resume_status(server: RunningServer, exchange: Exchange) -> str:
    batch = await server.services.reply_log.reader(exchange.message_id).read(0, 0)
    if batch is None:
        return "gone"
    return "finished" if batch.finished else "open"


async def test_without_redis_there_is_no_one_to_settle(database_url: str) -> None:
    async with two_workers(database_url, None) as (a, b):
        assert a.services.replies.orphans is None and b.services.replies.orphans is None
        exchange = await abandoned_reply(a, "rex", PIECES)
        await expire_lease(a, exchange)
        assert await b.services.transactor.run(release_expired, utcnow()) == 1
        rows = await chat_rows(b.engine, str(exchange.chat_id))
        assert rows[-1].role == "user"
        state = await books(b.engine, "rex")
        assert state.ledger_rows == 1 and state.total == state.ledger and state.reserved == 0


async def test_the_prompt_is_rebuilt_as_the_opening_made_it(
    database_url: str, redis_server: RedisServer
) -> None:
    async with two_workers(database_url, redis_server.url) as (a, b):
        exchange = await abandoned_reply(a, "sal", [])
        record = record_of(exchange)
        assert ReplyRecord.decode(record.encode()) == record
        system = b.services.settings.system_prompt_for("scripted")
        rebuilt = await b.services.transactor.run(prompt_of, record, system)
        assert rebuilt == exchange.request
        assert len(rebuilt.history) == 2  # the earlier exchange's two messages
        # the record is the first entry's, beside the event that names the reply
        redis: Any = b.services.reply_log._redis  # type: ignore[attr-defined]

        async def first_entry() -> bool:
            return bool(await redis.xrange(stream_key(exchange.message_id), count=1))

        await eventually(first_entry)
        ((entry_id, fields),) = await redis.xrange(stream_key(exchange.message_id), count=1)
        assert entry_id == b"0-1"
        assert ReplyRecord.decode(fields[b"m"]) == record
        assert orjson.loads(fields[b"d"])["message_id"] == str(exchange.message_id)


async def test_a_message_into_a_dead_replys_chat_settles_that_reply_first(
    database_url: str, redis_server: RedisServer
) -> None:
    """The opening does not release the expired reservation unbilled (as it does without
    Redis): the dead reply is settled from its log, then the message goes through."""
    async with two_workers(database_url, redis_server.url) as (a, b):
        exchange = await abandoned_reply(a, "tom", PIECES)
        await logged(b, exchange, "".join(PIECES))
        chat_id = str(exchange.chat_id)
        async with httpx.AsyncClient(base_url=b.url, timeout=30) as on_b:
            held = await stream_message(on_b, chat_id, "now?", token_for("tom"))
            assert held.status == 409  # the lease still runs
            await expire_lease(a, exchange)
            after = await stream_message(on_b, chat_id, "now", token_for("tom"))
        assert after.status == 200 and after.last["done"] is True
        rows = await chat_rows(b.engine, chat_id)
        assert [(r.role, r.status) for r in rows][2:] == [
            ("user", "complete"),
            ("assistant", "interrupted"),
            ("user", "complete"),
            ("assistant", "complete"),
        ]
        assert rows[3].content == "".join(PIECES)
        state = await books(b.engine, "tom")
        assert state.ledger_rows == 3 and state.total == state.ledger and state.reserved == 0


async def test_the_redis_log_keeps_what_a_dead_reply_needs(redis_server: RedisServer) -> None:
    """`RedisLog.left_behind` and `end_left` on their own, with a real redis-server."""
    lease = 2.0
    writer = RedisLog(aioredis.from_url(redis_server.url), MemoryLog(60, 1 << 20), 60, lease)
    other = RedisLog(aioredis.from_url(redis_server.url), MemoryLog(60, 1 << 20), 60, lease)
    redis: Any = aioredis.from_url(redis_server.url)
    try:
        reply_id, chat_id = uuid.uuid4(), uuid.uuid4()
        record = ReplyRecord(
            reservation_id=uuid.uuid4(),
            user_id="ulla",
            chat_id=chat_id,
            message_id=reply_id,
            user_message_id=uuid.uuid4(),
            user_message_at=utcnow(),
            model="scripted",
            plan="default",
            history_turns=3,
            output_cap=500,
        )
        first = {"chunk": "", "done": False, "message_id": str(reply_id), "user_message_id": "u"}
        await writer.begin(reply_id, chat_id, first, record)
        for piece in PIECES:  # one loop turn: written together, one entry
            await writer.append(reply_id, {"chunk": piece, "done": False})

        async def written() -> bool:
            left = await other.left_behind(chat_id)
            return left is not None and left.last_event == 1 + len(PIECES)

        await eventually(written)
        left = await other.left_behind(chat_id)
        assert left is not None
        assert (left.reply_id, left.record, left.text) == (reply_id, record, "".join(PIECES))
        # a dead writer's keys outlive its lease: three of them
        assert lease < await redis.ttl(stream_key(reply_id)) <= 3 * lease
        # a reply without a record (a process older than this one wrote it) is not settled
        plain_reply, plain_chat = uuid.uuid4(), uuid.uuid4()
        await writer.begin(plain_reply, plain_chat, first)

        async def plain_written() -> bool:
            return await other.holds(plain_reply, plain_chat)

        await eventually(plain_written)
        assert await other.left_behind(plain_chat) is None
        assert await other.left_behind(uuid.uuid4()) is None  # no log at all

        follower = asyncio.create_task(read_from(other, reply_id, 1 + len(PIECES)))
        end = {"chunk": "", "done": True, "finish_reason": "interrupted"}
        await other.end_left(left, end)
        assert await asyncio.wait_for(follower, 30) == [(2 + len(PIECES), end)]
        assert await other.left_behind(chat_id) is None  # it has its end now
        assert 0 < await redis.ttl(stream_key(reply_id)) <= 60  # the replay window
    finally:
        await writer.aclose()
        await other.aclose()
        await redis.aclose()


async def read_from(log: RedisLog, reply_id: uuid.UUID, after: int) -> list[tuple[int, Any]]:
    events: list[tuple[int, Any]] = []
    while True:
        batch = await log.reader(reply_id).read(after, 5.0)
        assert batch is not None
        events += [(n, orjson.loads(data)) for n, data in batch.events]
        after = events[-1][0] if events else after
        if batch.finished:
            return events


async def test_a_reader_ahead_of_the_log_still_gets_the_end(
    database_url: str, redis_server: RedisServer
) -> None:
    """The process that died sent its own readers events it had not written to Redis yet
    (they are written a few ms later, together); such a reader resumes with a
    Last-Event-ID past the log's last event, where the survivor then numbers its end.
    It gets that end, numbered after what it saw, whether it resumed before the sweep
    (waiting) or after it, instead of an empty stream."""
    async with two_workers(database_url, redis_server.url) as (a, b):
        exchange = await abandoned_reply(a, "ursa", PIECES)
        await logged(b, exchange, "".join(PIECES))
        chat_id = str(exchange.chat_id)
        logged_last = 1 + len(PIECES)  # the event naming the reply, then the pieces
        seen_last = str(logged_last + 1)  # one event sent but never written
        async with httpx.AsyncClient(base_url=b.url, timeout=60) as on_b:
            waiting = asyncio.create_task(
                resume(on_b, chat_id, "ursa", last_event_id_header=seen_last)
            )
            await expire_lease(a, exchange)
            assert await settler(b).settle_expired(utcnow()) == 1
            after_sweep = await resume(on_b, chat_id, "ursa", last_event_id_header=seen_last)
            early = await waiting
        for seen in (early, after_sweep):
            assert seen.status == 200
            assert seen.ids == [logged_last + 2]
            end = seen.last
            assert end["done"] is True and end["finish_reason"] == "interrupted"
            assert end["message_id"] == str(exchange.message_id)
        # a reader that follows from the log sees the ids it always did
        async with httpx.AsyncClient(base_url=b.url, timeout=30) as on_b:
            whole = await resume(on_b, chat_id, "ursa")
        assert whole.ids == list(range(1, logged_last + 2))
        assert whole.last == early.last


async def test_a_log_redis_lost_mid_reply_is_written_again_and_settles(
    database_url: str, redis_server: RedisServer
) -> None:
    """Redis restarts without its data (the throwaway server keeps nothing) while a reply
    streams. Its next pieces used to go to a log with no first entry: no record, no chat
    key. A resume elsewhere answered 204, and when the reply's process then died, the
    sweeper found nothing to settle from and released the reply unbilled. Now the writer
    sees the log gone and writes it again whole from its own copy."""
    async with two_workers(database_url, redis_server.url) as (a, b):
        exchange = await abandoned_reply(a, "rhea", PIECES)
        await logged(b, exchange, "".join(PIECES))
        redis_server.stop()
        redis_server.start()
        more = ["and ", "then"]
        for piece in more:
            await a.services.reply_log.append(exchange.message_id, {"chunk": piece, "done": False})
        text = "".join(PIECES + more)
        await logged(b, exchange, text)  # the whole log, its record with it
        chat_id = str(exchange.chat_id)
        # then its process dies: its lease runs out, and B's sweeper settles it
        await expire_lease(a, exchange)
        assert await settler(b).settle_expired(utcnow()) == 1
        ledger = await ledger_row(b.engine, str(exchange.message_id))
        assert ledger is not None
        assert (await chat_rows(b.engine, chat_id))[-1].content == text
        state = await books(b.engine, "rhea")
        assert state.total == state.ledger and state.reserved == 0
        async with httpx.AsyncClient(base_url=b.url, timeout=30) as on_b:
            seen = await resume(on_b, chat_id, "rhea")
        assert seen.status == 200
        assert seen.ids == list(range(1, len(PIECES) + len(more) + 3))
        assert seen.text == text and seen.last["done"] is True
