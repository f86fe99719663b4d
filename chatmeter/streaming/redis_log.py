"""Replies and stops shared through Redis (`CHATMETER_REDIS_URL`, SPEC section 11): a
reply generated on one worker can be resumed from any worker on any host, and a stop
reaches the holder within milliseconds.

Keys (prefix `chatmeter:`), each per reply id, never per chat, so a later reply can never
reuse an earlier one's events:
- `chatmeter:reply:{reply_id}`: a Stream; event N has the explicit id `0-N`, so
  `XREAD BLOCK … 0-N` resumes exactly after event N;
- `chatmeter:reply:{reply_id}:meta`: a hash: `chat_id`, and `last` (the id of the end
  event) once the reply has ended;
- `chatmeter:chat:{chat_id}:reply`: the chat's latest reply id.
Each expires `CHATMETER_REPLAY_SECONDS` after the reply's end (and a lease's worth of
seconds after its last event while it streams, so a dead worker's keys go too).
- channel `chatmeter:stop`: a chat id whose reply is to stop.

The process that generates a reply also keeps it in a `MemoryLog`: its own readers (the
request that asked, almost always) read memory, never Redis. Events go to Redis in the
background, those of one loop turn in one pipeline, so a reply costs a handful of round
trips whatever its length. If Redis goes away the reply still runs to its end and is
saved and billed; only resuming it elsewhere fails until Redis is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from chatmeter.jsonutil import dumps
from chatmeter.streaming.log import Batch, MemoryLog
from chatmeter.streaming.signals import OnStop, Resync

log = logging.getLogger("chatmeter.redis")

PREFIX = "chatmeter:"
STOP_CHANNEL = PREFIX + "stop"


def stream_key(reply_id: uuid.UUID) -> str:
    return f"{PREFIX}reply:{reply_id}"


def meta_key(reply_id: uuid.UUID) -> str:
    return f"{PREFIX}reply:{reply_id}:meta"


def chat_key(chat_id: uuid.UUID) -> str:
    return f"{PREFIX}chat:{chat_id}:reply"


def _number(entry_id: bytes) -> int:
    """Event N's stream id is `0-N`."""
    return int(entry_id.split(b"-")[1])


class RedisLog:
    def __init__(
        self, client: aioredis.Redis, local: MemoryLog, replay_seconds: float, lease_seconds: float
    ) -> None:
        self._redis = client
        self._local = local
        self._replay = max(1, int(replay_seconds))
        self._lease = max(1, int(lease_seconds))
        self._pending: dict[uuid.UUID, list[tuple[int, bytes]]] = {}
        self._numbers: dict[uuid.UUID, int] = {}
        self._finishing: dict[uuid.UUID, int] = {}
        self._chats: dict[uuid.UUID, uuid.UUID] = {}
        self._flush: asyncio.Task[None] | None = None

    # -- writing: the generating process -------------------------------------------------

    async def begin(self, reply_id: uuid.UUID, chat_id: uuid.UUID, first: dict[str, Any]) -> None:
        await self._local.begin(reply_id, chat_id, first)
        self._numbers[reply_id] = 0
        self._chats[reply_id] = chat_id
        self._queue(reply_id, dumps(first))

    async def append(self, reply_id: uuid.UUID, event: dict[str, Any]) -> None:
        await self._local.append(reply_id, event)
        if reply_id in self._numbers:
            self._queue(reply_id, dumps(event))

    async def finish(self, reply_id: uuid.UUID) -> None:
        await self._local.finish(reply_id)
        number = self._numbers.pop(reply_id, None)
        if number is None:
            return
        self._finishing[reply_id] = number
        self._schedule()
        flush = self._flush
        if flush is not None:
            # the end is in Redis before the job ends (shutdown waits for jobs)
            with contextlib.suppress(Exception):
                await asyncio.shield(flush)

    def _queue(self, reply_id: uuid.UUID, data: bytes) -> None:
        self._numbers[reply_id] += 1
        self._pending.setdefault(reply_id, []).append((self._numbers[reply_id], data))
        self._schedule()

    def _schedule(self) -> None:
        if self._flush is None or self._flush.done():
            self._flush = asyncio.get_running_loop().create_task(self._write())

    async def _write(self) -> None:
        """Everything queued, in one pipeline; then whatever came meanwhile."""
        await asyncio.sleep(0)  # let the loop turn's other events join this write
        while self._pending or self._finishing:
            pending, self._pending = self._pending, {}
            finishing, self._finishing = self._finishing, {}
            pipe = self._redis.pipeline(transaction=False)
            for reply_id, events in pending.items():
                key = stream_key(reply_id)
                for number, data in events:
                    pipe.xadd(key, {"d": data}, id=f"0-{number}")
                if events[0][0] == 1:
                    chat_id = self._chats[reply_id]
                    pipe.hset(meta_key(reply_id), "chat_id", str(chat_id))
                    pipe.set(chat_key(chat_id), str(reply_id), ex=self._lease + self._replay)
                ttl = self._lease if reply_id not in finishing else self._replay
                pipe.expire(key, ttl)
                pipe.expire(meta_key(reply_id), ttl)
            for reply_id, last in finishing.items():
                self._chats.pop(reply_id, None)
                pipe.hset(meta_key(reply_id), "last", last)
                pipe.expire(stream_key(reply_id), self._replay)
                pipe.expire(meta_key(reply_id), self._replay)
            try:
                await pipe.execute()
            except (RedisError, OSError):
                log.warning("could not write %d replies to Redis", len(pending) + len(finishing))

    # -- reading: any process -----------------------------------------------------------

    async def read(self, reply_id: uuid.UUID, after: int, wait: float) -> Batch | None:
        if self._local.has(reply_id):
            return await self._local.read(reply_id, after, wait)
        key = stream_key(reply_id)
        start = f"0-{after}"
        redis: Any = self._redis  # redis-py's result types are unions of every reply shape
        try:
            entries = await redis.xrange(key, min=f"({start}", max="+")
            if not entries and wait > 0:
                found = await redis.xread({key: start}, block=max(1, int(wait * 1000)))
                entries = found[0][1] if found else []
            meta = await redis.hgetall(meta_key(reply_id))
        except (RedisError, OSError):
            log.warning("could not read reply %s from Redis", reply_id)
            return None
        if not meta:
            return None
        events = [(_number(entry_id), bytes(fields[b"d"])) for entry_id, fields in entries]
        last = meta.get(b"last")
        cursor = events[-1][0] if events else after
        return Batch(events, last is not None and cursor >= int(last))

    async def current(self, chat_id: uuid.UUID) -> uuid.UUID | None:
        redis: Any = self._redis
        try:
            value = await redis.get(chat_key(chat_id))
        except (RedisError, OSError):
            return await self._local.current(chat_id)
        return uuid.UUID(value.decode()) if value else await self._local.current(chat_id)

    async def holds(self, reply_id: uuid.UUID, chat_id: uuid.UUID) -> bool:
        if await self._local.holds(reply_id, chat_id):
            return True
        redis: Any = self._redis
        try:
            held = await redis.hget(meta_key(reply_id), "chat_id")
        except (RedisError, OSError):
            return False
        return held is not None and held.decode() == str(chat_id)

    async def aclose(self) -> None:
        if self._flush is not None:
            with contextlib.suppress(Exception):
                await self._flush
        await self._local.aclose()
        await self._redis.aclose()


class RedisSignals:
    """Stops announced on the channel `chatmeter:stop`."""

    def __init__(self, client: aioredis.Redis, retry_seconds: float = 1.0) -> None:
        self._redis = client
        self._retry_seconds = retry_seconds

    async def publish(self, chat_id: uuid.UUID) -> None:
        try:
            await self._redis.publish(STOP_CHANNEL, str(chat_id))
        except (RedisError, OSError):
            log.warning("could not announce the stop of chat %s; the poll will", chat_id)

    async def run(self, on_stop: OnStop, resync: Resync) -> None:
        while True:
            pubsub: Any = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(STOP_CHANNEL)
                await resync()  # stops announced while nobody listened
                async for message in pubsub.listen():
                    if message["type"] == "message":
                        with contextlib.suppress(ValueError):
                            on_stop(uuid.UUID(message["data"].decode()))
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("the stop listener lost Redis; reconnecting")
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(self._retry_seconds)
