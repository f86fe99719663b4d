"""The reply logs as units: numbering, waiting readers, the end, the replay window and
the bound on what is held; the Redis log against a real redis-server."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import tracemalloc
import uuid
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from chatmeter.streaming.log import MemoryLog, ReplyLog
from chatmeter.streaming.redis_log import (
    WRITE_SCRIPT,
    RedisLog,
    chat_key,
    connect,
    stream_key,
)
from tests.support.redis import RedisServer
from tests.support.waiting import eventually

FIRST = {"chunk": "", "done": False, "message_id": "m", "user_message_id": "u"}
END = {"chunk": "", "done": True, "tokens_used": 3}


async def write_reply(log: ReplyLog, reply_id: uuid.UUID, chat_id: uuid.UUID) -> None:
    await log.begin(reply_id, chat_id, FIRST)
    for piece in ("a", "b"):
        await log.append(reply_id, {"chunk": piece, "done": False})
        await asyncio.sleep(0)
    await log.append(reply_id, END)
    await log.finish(reply_id)


async def read_all(
    log: ReplyLog, reply_id: uuid.UUID, after: int = 0
) -> list[tuple[int, dict[str, Any]]]:
    events: list[tuple[int, dict[str, Any]]] = []
    while True:
        batch = await log.reader(reply_id).read(after, 5.0)
        assert batch is not None
        events += [(number, orjson.loads(data)) for number, data in batch.events]
        after = events[-1][0] if events else after
        if batch.finished:
            return events


async def test_a_reader_waits_for_events_and_stops_at_the_end() -> None:
    log = MemoryLog(replay_seconds=60, max_bytes=1 << 20)
    reply_id, chat_id = uuid.uuid4(), uuid.uuid4()
    await log.begin(reply_id, chat_id, FIRST)
    reader = asyncio.create_task(read_all(log, reply_id))
    await asyncio.sleep(0)
    assert not reader.done()
    for piece in ("a", "b"):
        await log.append(reply_id, {"chunk": piece, "done": False})
    await log.append(reply_id, END)
    await log.finish(reply_id)
    events = await reader
    assert [n for n, _ in events] == [1, 2, 3, 4]
    assert events[1][1] == {"chunk": "a", "done": False} and events[3][1] == END
    assert await read_all(log, reply_id, after=2) == events[2:]
    assert await log.current(chat_id) == reply_id
    assert await log.holds(reply_id, chat_id) and not await log.holds(reply_id, uuid.uuid4())
    idle = await log.reader(uuid.uuid4()).read(0, 0.01)
    assert idle is None


async def test_an_idle_read_returns_empty_after_the_wait() -> None:
    log = MemoryLog(replay_seconds=60, max_bytes=1 << 20)
    reply_id = uuid.uuid4()
    await log.begin(reply_id, uuid.uuid4(), FIRST)
    batch = await log.reader(reply_id).read(1, 0.01)
    assert batch is not None and batch.events == [] and not batch.finished


async def test_finished_replies_expire_and_the_oldest_go_first_past_the_bound() -> None:
    log = MemoryLog(replay_seconds=0.05, max_bytes=1 << 20)
    chat = uuid.uuid4()
    old = uuid.uuid4()
    await write_reply(log, old, chat)

    async def gone() -> bool:
        return await log.current(chat) is None

    await eventually(gone)
    assert len(log) == 0 and log.held_bytes == 0

    small = MemoryLog(replay_seconds=600, max_bytes=2048)
    ids = [uuid.uuid4() for _ in range(10)]
    for reply_id in ids:
        await write_reply(small, reply_id, uuid.uuid4())
    assert small.held_bytes <= 2048
    assert await small.reader(ids[-1]).read(0, 0) is not None
    assert await small.reader(ids[0]).read(0, 0) is None
    # a reply still streaming is never dropped, whatever the bound
    live = uuid.uuid4()
    await small.begin(live, uuid.uuid4(), FIRST)
    await small.append(live, {"chunk": "x" * 5000, "done": False})
    for reply_id in ids[:3]:
        await write_reply(small, reply_id, uuid.uuid4())
    assert await small.reader(live).read(0, 0) is not None


async def test_what_the_memory_log_counts_is_what_it_holds() -> None:
    """The bound (`CHATMETER_REPLAY_MAX_BYTES`) counts `held_bytes`; the memory really
    taken by the held replies may not be several times that. (orjson's bytes keep a
    4 KiB buffer whatever their length: two encoded events held per reply were 8 KiB
    for a reply counted as 400 bytes.)"""
    log = MemoryLog(replay_seconds=600, max_bytes=1 << 30)
    replies = 500
    pieces = [f"piece {i} of a reply " for i in range(10)]
    ids = [(uuid.uuid4(), uuid.uuid4()) for _ in range(replies)]
    first = [{**FIRST, "message_id": str(r), "user_message_id": str(c)} for r, c in ids]
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for (reply_id, chat_id), opening in zip(ids, first, strict=True):
            await log.begin(reply_id, chat_id, opening)
            for piece in pieces:
                await log.append(reply_id, {"chunk": piece, "done": False})
            await log.append(reply_id, {**END, "finish_reason": "stop", "usage": {"a": 1}})
            await log.finish(reply_id)
        gc.collect()
        taken = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(log) == replies
    assert taken <= 1.5 * log.held_bytes, (taken / replies, log.held_bytes / replies)


async def test_the_redis_log_is_read_from_another_process(redis_server: RedisServer) -> None:
    writer_client = aioredis.from_url(redis_server.url)
    reader_client = aioredis.from_url(redis_server.url)
    writer = RedisLog(writer_client, MemoryLog(60, 1 << 20), 60, 30)
    reader = RedisLog(reader_client, MemoryLog(60, 1 << 20), 60, 30)
    try:
        reply_id, chat_id = uuid.uuid4(), uuid.uuid4()
        await writer.begin(reply_id, chat_id, FIRST)

        async def started() -> bool:
            return await reader.holds(reply_id, chat_id)

        # a resume asks `holds` first (the route's 204 otherwise), then follows
        await eventually(started)
        follower = asyncio.create_task(read_all(reader, reply_id))
        await write_reply_rest(writer, reply_id)
        events = await follower
        assert [n for n, _ in events] == [1, 2, 3, 4] and events[3][1] == END
        assert await read_all(reader, reply_id, after=3) == events[3:]
        assert await reader.current(chat_id) == reply_id
        # keys per reply, expiring after the replay window

        async def expiring() -> bool:
            ttls = [
                await writer_client.ttl(stream_key(reply_id)),
                await writer_client.ttl(chat_key(chat_id)),
            ]
            return all(0 < ttl <= 60 for ttl in ttls)

        await eventually(expiring)
        assert await reader.reader(uuid.uuid4()).read(0, 0.01) is None
    finally:
        await writer.aclose()
        await reader.aclose()


async def write_reply_rest(log: ReplyLog, reply_id: uuid.UUID) -> None:
    for piece in ("a", "b"):
        await log.append(reply_id, {"chunk": piece, "done": False})
    await log.append(reply_id, END)
    await log.finish(reply_id)


async def test_an_end_written_before_the_finish_is_still_seen(redis_server: RedisServer) -> None:
    """The end event reached Redis in one write, the finish in a later one."""
    writer = RedisLog(aioredis.from_url(redis_server.url), MemoryLog(60, 1 << 20), 60, 30)
    reader = RedisLog(aioredis.from_url(redis_server.url), MemoryLog(60, 1 << 20), 60, 30)
    client = aioredis.from_url(redis_server.url)
    try:
        reply_id, chat_id = uuid.uuid4(), uuid.uuid4()
        await writer.begin(reply_id, chat_id, FIRST)
        for piece in ("a", "b"):
            await writer.append(reply_id, {"chunk": piece, "done": False})
        await writer.append(reply_id, END)

        async def written() -> bool:
            return bool(await client.xrange(stream_key(reply_id), min="(0-3", max="+"))

        await eventually(written)
        await writer.finish(reply_id)
        events = await read_all(reader, reply_id)
        assert [n for n, _ in events] == [1, 2, 3, 4] and events[-1][1] == END
        assert await read_all(reader, reply_id, after=4) == []
    finally:
        await writer.aclose()
        await reader.aclose()
        await client.aclose()


async def test_replies_written_at_once_cost_one_command_and_their_keys_expire(
    redis_server: RedisServer,
) -> None:
    """Replies whose events all reach Redis in one write: one script call for all of them
    (each command a pipeline sends costs the worker CPU), which writes each one's entry,
    its chat's key and its stream's TTL, nothing more."""
    client = aioredis.from_url(redis_server.url)
    writer = RedisLog(aioredis.from_url(redis_server.url), MemoryLog(60, 1 << 20), 60, 30)
    try:
        await write_at_once(writer, client, 1)  # loads the script
        await client.config_resetstat()
        replies = await write_at_once(writer, client, 3)
        stats: dict[str, Any] = await client.info("commandstats")
        calls = {
            name: stats.get(f"cmdstat_{name}", {}).get("calls", 0)
            for name in ("evalsha", "set", "xadd", "expire")
        }
        assert calls == {"evalsha": 1, "set": 3, "xadd": 3, "expire": 3}
        for reply_id, chat_id in replies:
            assert 0 < await client.ttl(stream_key(reply_id)) <= 60
            assert 0 < await client.ttl(chat_key(chat_id)) <= 60
            assert await client.get(chat_key(chat_id)) == str(reply_id).encode()
            entries: Any = await client.xrange(stream_key(reply_id), min="-", max="+")
            assert [
                (entry_id, fields[b"n"], fields[b"c"], fields[b"e"]) for entry_id, fields in entries
            ] == [(b"0-3", b"1", str(chat_id).encode(), b"1")]
    finally:
        await writer.aclose()
        await client.aclose()


async def write_at_once(
    writer: RedisLog, client: aioredis.Redis, count: int
) -> list[tuple[uuid.UUID, uuid.UUID]]:
    """`count` replies begun and ended in one loop turn, once Redis holds their ends."""
    replies = [(uuid.uuid4(), uuid.uuid4()) for _ in range(count)]
    for reply_id, chat_id in replies:
        await writer.begin(reply_id, chat_id, FIRST)
        await writer.append(reply_id, {"chunk": "a", "done": False})
        await writer.append(reply_id, END)
        await writer.finish(reply_id)

    async def ended() -> bool:
        for reply_id, _ in replies:
            entries = await client.xrange(stream_key(reply_id), min="-", max="+") or []
            if not entries or b"e" not in (entries[-1][1] or {}):
                return False
        return True

    await eventually(ended)
    return replies


async def test_a_redis_that_restarted_is_written_again(redis_server: RedisServer) -> None:
    """A restarted Redis has broken every pooled connection and forgotten the write
    script: the next write still lands (a new connection, the script loaded again)."""
    client = connect(redis_server.url)
    writer = RedisLog(client, MemoryLog(60, 1 << 20), 60, 30)
    try:
        await write_at_once(writer, client, 2)  # two pooled connections: the test's too
        redis_server.stop()
        redis_server.start()
        [(reply_id, _)] = await write_at_once(writer, client, 1)
        assert await client.xlen(stream_key(reply_id)) == 1
        sha = hashlib.sha1(WRITE_SCRIPT.encode()).hexdigest()
        assert await client.script_exists(sha) == [True]
    finally:
        await writer.aclose()


async def test_events_written_while_redis_was_away_reach_it_when_it_is_back(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A reply's log has no hole: what could not be written while Redis was away is
    written, in order, once it is back, and a reader on another worker reads it all."""
    client = connect(redis_server.url)
    writer = RedisLog(connect(redis_server.url), MemoryLog(60, 1 << 20), 60, 30)
    reader = RedisLog(connect(redis_server.url), MemoryLog(60, 1 << 20), 60, 30)
    try:
        reply_id, chat_id = uuid.uuid4(), uuid.uuid4()
        await writer.begin(reply_id, chat_id, FIRST)
        redis_server.stop()  # before the write that begin asked for (a restart loses data)
        try:
            await writer.append(reply_id, {"chunk": "a", "done": False})

            async def failed() -> bool:
                return "could not write 1 replies to Redis" in caplog.text

            await eventually(failed)
            await writer.append(reply_id, {"chunk": "b", "done": False})
        finally:
            redis_server.start()
        await writer.append(reply_id, END)
        await writer.finish(reply_id)

        async def written_again() -> bool:  # by the writer, on its own
            return bool(await client.exists(stream_key(reply_id)))

        await eventually(written_again)
        events = await read_all(reader, reply_id)
        assert [n for n, _ in events] == [1, 2, 3, 4]
        assert [event.get("chunk") for _, event in events[1:3]] == ["a", "b"]
        assert events[3][1] == END
        assert 0 < await client.ttl(stream_key(reply_id)) <= 60
    finally:
        await writer.aclose()
        await reader.aclose()
        await client.aclose()


async def test_an_entry_repeating_events_of_the_one_before_is_read_once(
    redis_server: RedisServer,
) -> None:
    """A write retried after Redis took it but its answer was lost carries the events
    again with those queued since, as a later entry: each event is read once."""
    client = connect(redis_server.url)
    reader = RedisLog(connect(redis_server.url), MemoryLog(60, 1 << 20), 60, 30)
    try:
        reply_id = uuid.uuid4()
        key = stream_key(reply_id)
        first, piece = orjson.dumps(FIRST), orjson.dumps({"chunk": "a", "done": False})
        await client.xadd(key, {"n": 1, "d": first}, id="0-1")
        await client.xadd(key, {"n": 1, "d": b"\n".join([first, piece])}, id="0-2")
        await client.xadd(key, {"n": 3, "d": orjson.dumps(END), "e": 1}, id="0-3")
        events = await read_all(reader, reply_id)
        assert [n for n, _ in events] == [1, 2, 3]
        assert await read_all(reader, reply_id, after=1) == events[1:]
    finally:
        await reader.aclose()
        await client.aclose()


async def test_a_reader_waits_past_the_clients_socket_timeout(redis_server: RedisServer) -> None:
    """A reply silent for longer than redis-py's socket timeout (5 s by default since
    redis-py 8; a thinking model can be): the wait ends empty, as an idle wait does, so
    the resume sends a ping and goes on; it used to end the resume instead."""
    writer = RedisLog(connect(redis_server.url), MemoryLog(60, 1 << 20), 60, 30)
    reader = RedisLog(connect(redis_server.url), MemoryLog(60, 1 << 20), 60, 30)
    try:
        reply_id, chat_id = uuid.uuid4(), uuid.uuid4()
        await writer.begin(reply_id, chat_id, FIRST)

        async def started() -> bool:
            return await reader.holds(reply_id, chat_id)

        await eventually(started)
        batch = await reader.reader(reply_id).read(1, 6.0)
        assert batch is not None and batch.events == [] and not batch.finished
        # and still wakes for what comes
        follower = asyncio.create_task(read_all(reader, reply_id, after=1))
        await write_reply_rest(writer, reply_id)
        assert [n for n, _ in await follower] == [2, 3, 4]
    finally:
        await writer.aclose()
        await reader.aclose()
