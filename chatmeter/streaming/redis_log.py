"""Replies and stops shared through Redis (`CHATMETER_REDIS_URL`, SPEC section 11): a
reply generated on one worker can be resumed from any worker on any host, and a stop
reaches the holder within milliseconds.

Keys (prefix `chatmeter:`), each per reply id, never per chat, so a later reply can never
reuse an earlier one's events:
- `chatmeter:reply:{reply_id}`: a Stream of the reply's events. The events written
  together (those of one loop turn) are one entry, whose id is `0-N` with N the number of
  its last event and whose fields are `n` (the number of its first event), `d` (their
  JSON payloads, one a line), `c` (the chat id, on the first entry) and `e` (on the entry
  holding the end event), and `m` on the first entry: the reply's `ReplyRecord`, what
  another process needs to settle it if this one dies mid-reply (`orphans.py`). So
  `XREAD BLOCK … 0-N` finds exactly what follows event N, and a reply costs a handful of
  Redis commands whatever its length;
- `chatmeter:chat:{chat_id}:reply`: the chat's latest reply id.
Both expire `CHATMETER_REPLAY_SECONDS` after the reply's end; while it streams,
`STREAMING_TTL_LEASES` leases after their last renewal: a dead worker's keys go too, but
only after the sweeper that releases its expired reservation (about a lease and a third
after the death) has settled the reply from them.
- channel `chatmeter:stop`: the reservation id of a reply that is to stop.

The process that generates a reply also keeps it in a `MemoryLog`: its own readers (the
request that asked, almost always) read memory, never Redis. Events go to Redis in the
background. If Redis goes away the reply still runs to its end and is saved and billed;
only resuming it elsewhere fails until Redis is back. What could not be written is
written when it is back (tried every `WRITE_RETRY_SECONDS`, for a finished reply during
the replay window), so a reply's log has no hole.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import orjson
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from chatmeter.jsonutil import dumps
from chatmeter.streaming.log import Batch, LeftReply, MemoryLog, MemoryReader, ReplyRecord
from chatmeter.streaming.signals import OnStop, Resync

log = logging.getLogger("chatmeter.redis")

PREFIX = "chatmeter:"
STOP_CHANNEL = PREFIX + "stop"
READ_RETRY_SECONDS = 10.0
# a reader waits for new events in blocking reads of at most this long, under the
# client's socket timeout (redis-py 8 reads with a 5 s one by default: a longer XREAD
# BLOCK failed as a timeout, and a resume whose reply stayed silent ~10 s ended empty)
BLOCK_SECONDS = 2.0
# the `e` field of an entry holding a reply's end: written by its own process, or by
# another process's sweeper that settled it after the process died (`end_left`)
ENDED = b"1"
ENDED_ELSEWHERE = b"2"
# a streaming reply's keys outlive their last renewal by this many leases: the sweeper
# finds a dead worker's reservation expired a lease after its last renewal, plus up to
# a third of a lease (its period), and must still find the log to settle the reply
STREAMING_TTL_LEASES = 3
# events wait this long for others to join their write (a few ms: the process's own
# readers read memory; only a resume elsewhere, or a crash, sees the delay)
WRITE_EVERY_SECONDS = 0.002
WRITE_RETRY_SECONDS = 0.5  # while Redis is away, a write is tried again this often

# One call writes every reply that has something to write: redis-py spends about as much
# CPU on each command of a pipeline as Redis does, and on each argument of a command
# (its buffer is copied again for each small one, and each is encoded on its own), so a
# write is one command with one argument however many replies it holds: the keys too
# are in it, not in KEYS (the keys of one call are those of many replies, so the
# script could never run on Redis Cluster anyway). ARGV[1]: a JSON array, for each reply
# [the entry's id (empty: no entry), its `n`, its `d`, the chat id (`c`, on the first
# entry), the record (`m`, on the first entry, may be empty), 1 if it holds the end
# (`e`), the TTL for both keys (0: leave them), the reply id to SET as the chat's latest
# (empty: leave it), the reply's stream key, its chat's key]. Returns the (1-based)
# indexes of the replies whose log Redis no longer has (a restart without its data):
# nothing is written for them, and the writer writes their log again whole.
WRITE_SCRIPT = """
local writes = cjson.decode(ARGV[1])
local lost = {}
for i, w in ipairs(writes) do
  local stream, chat, ttl = w[9], w[10], w[7]
  if w[4] == '' and redis.call('EXISTS', stream) == 0 then
    table.insert(lost, i)
  elseif w[1] ~= '' then
    local fields = {'n', w[2], 'd', w[3]}
    if w[4] ~= '' then table.insert(fields, 'c'); table.insert(fields, w[4]) end
    if w[5] ~= '' then table.insert(fields, 'm'); table.insert(fields, w[5]) end
    if w[6] ~= 0 then table.insert(fields, 'e'); table.insert(fields, w[6]) end
    redis.pcall('XADD', stream, w[1], unpack(fields))
  end
  if lost[#lost] == i then
    -- nothing more for a lost log
  elseif w[8] ~= '' then
    redis.call('SET', chat, w[8], 'EX', ttl)
  elseif ttl ~= 0 then
    redis.call('EXPIRE', chat, ttl)
  end
  if ttl ~= 0 and lost[#lost] ~= i then redis.call('EXPIRE', stream, ttl) end
end
return lost
"""


def connect(url: str) -> aioredis.Redis:
    """A client for `url` that sends a command again, once and at once, on a new
    connection when its pooled one turns out broken (Redis restarted, or the connection
    dropped while idle). Without it the first command on each pooled connection after a
    restart fails, and a write lost that way leaves a hole in a reply's log."""
    return aioredis.from_url(
        url, retry=Retry(NoBackoff(), 1), retry_on_error=[RedisConnectionError]
    )


def stream_key(reply_id: uuid.UUID) -> str:
    return f"{PREFIX}reply:{reply_id}"


def chat_key(chat_id: uuid.UUID | str) -> str:
    return f"{PREFIX}chat:{chat_id}:reply"


@dataclass(eq=False, slots=True)
class _Writing:
    """A reply this process writes to Redis: what is queued, and what was written; its
    keys and ids as text, made once (a UUID's text is made in Python, each time)."""

    stream: str  # `stream_key`
    chat: str  # `chat_key`
    chat_id: str
    reply_id: str
    record: bytes | None = None  # the ReplyRecord, written with the first entry
    queued: list[bytes] = field(default_factory=list)
    written: int = 0  # events already in Redis
    renewed_at: float = 0.0
    finished: bool = False
    failing_since: float | None = None  # when a write of it first failed, if it did


class _Taken(NamedTuple):
    """A reply as a write found it: what to put back if the write fails."""

    reply_id: uuid.UUID
    writing: _Writing
    written: int
    queued: list[bytes]


def _script_write(
    keys: tuple[str, str],
    entry_id: str,
    first: int,
    data: str,
    *,
    chat: str = "",
    record: str = "",
    end: bool = False,
    ttl: int = 0,
    latest: str = "",
    elsewhere: bool = False,
) -> tuple[str | int, ...]:
    """One reply's part of `WRITE_SCRIPT`'s argument, in the order the script reads it:
    `keys` are its stream's and its chat's. `elsewhere`: the end is a sweeper's, for a
    reply whose process died."""
    ended = int(ENDED_ELSEWHERE if elsewhere else ENDED) if end else 0
    return (entry_id, first, data, chat, record, ended, ttl, latest, *keys)


def _number(entry_id: bytes) -> int:
    """An entry's id is `0-N`, N the number of its last event."""
    return int(entry_id.split(b"-")[1])


def _entries(entries: Any, after: int) -> list[tuple[int, bytes]]:
    """The events after `after` in stream entries, each once: an entry may begin before
    it, or repeat events of the one before (a write retried after Redis took it but its
    answer was lost, with the events queued since)."""
    events: list[tuple[int, bytes]] = []
    for _entry_id, fields in entries:
        number = int(fields[b"n"])
        for data in bytes(fields[b"d"]).split(b"\n"):
            if number > after:
                events.append((number, data))
                after = number
            number += 1
    return events


def _end_for_reader_ahead(entries: Any, after: int) -> list[tuple[int, bytes]]:
    """A sweeper's end (`end_left`) numbered at or below `after`, numbered after it: the
    reader was sent events its dead process never wrote here (they are written a few ms
    after they are sent), so the number the sweeper gave the end is one it has seen."""
    for entry_id, fields in entries:
        if fields.get(b"e") == ENDED_ELSEWHERE and _number(entry_id) <= after:
            return [(after + 1, bytes(fields[b"d"]))]
    return []


class RedisLog:
    keeps_records = True

    def __init__(
        self, client: aioredis.Redis, local: MemoryLog, replay_seconds: float, lease_seconds: float
    ) -> None:
        self._redis = client
        self._local = local
        self._replay = max(1, int(replay_seconds))
        self._lease = max(1, int(lease_seconds))
        self._streaming_ttl = max(1, int(lease_seconds * STREAMING_TTL_LEASES))
        self._writing: dict[uuid.UUID, _Writing] = {}
        self._flush: asyncio.Task[None] | None = None
        self._retry: asyncio.TimerHandle | None = None  # while Redis is away
        self._renewal: asyncio.TimerHandle | None = None  # while replies stream
        self._script = client.register_script(WRITE_SCRIPT)

    # -- writing: the generating process -------------------------------------------------

    async def begin(
        self,
        reply_id: uuid.UUID,
        chat_id: uuid.UUID,
        first: dict[str, Any],
        record: ReplyRecord | None = None,
    ) -> None:
        await self._local.begin(reply_id, chat_id, first)
        encoded = record.encode() if record is not None else None
        chat = str(chat_id)
        self._writing[reply_id] = _Writing(
            stream_key(reply_id), chat_key(chat), chat, str(reply_id), encoded, [dumps(first)]
        )
        self._schedule()

    async def append(self, reply_id: uuid.UUID, event: dict[str, Any]) -> None:
        await self._local.append(reply_id, event)
        writing = self._writing.get(reply_id)
        if writing is not None and not writing.finished:
            writing.queued.append(dumps(event))
            self._schedule()

    async def finish(self, reply_id: uuid.UUID) -> None:
        await self._local.finish(reply_id)
        writing = self._writing.get(reply_id)
        if writing is None:
            return
        writing.finished = True
        self._schedule()

    def _schedule(self) -> None:
        if self._retry is None and (self._flush is None or self._flush.done()):
            self._flush = asyncio.get_running_loop().create_task(self._write())

    def _retry_now(self) -> None:
        self._retry = None
        self._schedule()

    def _renew_later(self) -> None:
        """Come back to renew the keys of the replies still streaming, even those that
        write nothing meanwhile: a model that thinks before it writes is silent for up
        to the provider idle timeout, and keys renewed only with an entry expired while
        the reply streamed (a resume elsewhere answered 204; had the process died, the
        sweeper found no log to settle the reply from)."""
        if self._writing and self._renewal is None:
            self._renewal = asyncio.get_running_loop().call_later(self._lease / 3, self._renew_now)

    def _renew_now(self) -> None:
        self._renewal = None
        self._schedule()

    async def _write(self) -> None:
        """Everything queued, one entry a reply, in one script call; then what came since."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(WRITE_EVERY_SECONDS)  # what comes meanwhile joins the write
            now = loop.time()
            renew_before = now - self._lease / 3
            due = [
                (r, w)
                for r, w in self._writing.items()
                if w.queued or w.finished or w.renewed_at < renew_before
            ]
            if not due:
                self._renew_later()
                return
            writes: list[tuple[str | int, ...]] = []
            taken: list[_Taken] = []
            for reply_id, writing in due:
                taken.append(_Taken(reply_id, writing, writing.written, writing.queued))
                writes.append(self._writes(writing, now))
                if writing.finished:
                    del self._writing[reply_id]
            try:
                lost = await self._script(args=[dumps(writes)])
            except (RedisError, OSError) as exc:
                log.warning("could not write %d replies to Redis: %r", len(due), exc)
                self._put_back(taken, now)
                self._retry = loop.call_later(WRITE_RETRY_SECONDS, self._retry_now)
                return
            for _, writing in due:
                writing.failing_since = None
            for index in lost or []:
                await self._write_again(*due[int(index) - 1])

    async def _write_again(self, reply_id: uuid.UUID, writing: _Writing) -> None:
        """Redis no longer has the reply's log (it restarted without its data): write it
        again whole from this process's copy, first entry, record and chat key included.
        Without it the rest of the reply went to a log with no first entry: no resume
        found it (204), and had this process died, the sweeper found no record and
        released the reply unbilled."""
        batch = await self._local.reader(reply_id).read(0, 0)
        if batch is None:
            log.warning("Redis lost the log of reply %s, no longer held here", reply_id)
            return
        log.warning("Redis lost the log of reply %s; writing it again", reply_id)
        writing.written = 0
        writing.queued = [data for _, data in batch.events]
        writing.renewed_at = 0.0
        self._writing[reply_id] = writing

    def _put_back(self, taken: list[_Taken], now: float) -> None:
        """What a failed write took goes back in the queue, to be written when Redis is
        back: a reply's log never has a hole (a write whose answer was lost is written
        again harmlessly: an entry id Redis has already is refused). A finished reply
        is given up once it has failed for the replay window: its log would be gone."""
        for reply_id, writing, written, queued in taken:
            if writing.failing_since is None:
                writing.failing_since = now
            if writing.finished and now - writing.failing_since > self._replay:
                log.warning("gave up writing reply %s to Redis", reply_id)
                continue
            writing.written = written
            writing.queued = queued + writing.queued
            writing.renewed_at = 0.0  # its TTL is set again with the next entry
            self._writing[reply_id] = writing

    def _writes(self, writing: _Writing, now: float) -> tuple[str | int, ...]:
        """What the script writes for one reply: its entry, if any, the TTL of its keys,
        the chat's latest reply."""
        started = writing.written == 0 and bool(writing.queued)
        entry_id, first, data = "", 0, ""
        if writing.queued:
            first = writing.written + 1
            writing.written += len(writing.queued)
            entry_id, data = f"0-{writing.written}", b"\n".join(writing.queued).decode()
            writing.queued = []
        elif writing.finished:
            # the end was written already: an empty entry marks it
            first = writing.written + 1
            entry_id = f"0-{first}"
        ttl = 0
        if writing.finished:
            ttl = self._replay
        elif started or now - writing.renewed_at > self._lease / 3:
            writing.renewed_at = now
            ttl = self._streaming_ttl
        return _script_write(
            (writing.stream, writing.chat),
            entry_id,
            first,
            data,
            chat=writing.chat_id if started else "",
            record=writing.record.decode() if started and writing.record is not None else "",
            end=writing.finished,
            ttl=ttl,
            latest=writing.reply_id if started else "",
        )

    # -- reading: any process -----------------------------------------------------------

    def reader(self, reply_id: uuid.UUID) -> RedisReader:
        return RedisReader(self, self._local.reader(reply_id))

    async def read_shared(self, reply_id: uuid.UUID, after: int, wait: float) -> Batch | None:
        """The reply as Redis holds it."""
        # Redis that fails for a moment (a reconnect) costs the reader a pause, not the
        # rest of the reply; one that stays away ends the resume
        loop = asyncio.get_running_loop()
        give_up = loop.time() + READ_RETRY_SECONDS
        while True:
            try:
                return await self._read_redis(reply_id, after, wait)
            except (RedisError, OSError) as exc:
                if loop.time() >= give_up:
                    log.warning("could not read reply %s from Redis: %r", reply_id, exc)
                    return None
                await asyncio.sleep(0.2)

    async def _read_redis(self, reply_id: uuid.UUID, after: int, wait: float) -> Batch | None:
        key = stream_key(reply_id)
        start = f"0-{after}"
        redis: Any = self._redis  # redis-py's result types are unions of every reply shape
        entries = await redis.xrange(key, min=f"({start}", max="+")
        if not entries:
            last = await redis.xrevrange(key, max="+", min="-", count=1)
            if not last:
                return None  # no such reply, or expired
            if _number(last[0][0]) > after:
                # written between the two reads: read again, the end may be in it
                entries = await redis.xrange(key, min=f"({start}", max="+")
            elif b"e" in last[0][1]:
                entries = last  # the reader has every event, or is ahead of the log
            elif wait > 0:
                # from the log's last entry, not the reader's: a reader ahead of the log
                # must wake for a sweeper's end numbered below its own cursor
                entries = await self._wait(key, f"0-{_number(last[0][0])}", wait)
        events = [(n, data) for n, data in _entries(entries, after) if data]
        finished = any(b"e" in fields for _, fields in entries)
        if finished and not events:
            events = _end_for_reader_ahead(entries, after)
        return Batch(events, finished)

    async def _wait(self, key: str, start: str, wait: float) -> Any:
        """The entries after `start` as soon as there are some, within `wait` seconds
        (none then), read in blocks of at most `BLOCK_SECONDS`."""
        redis: Any = self._redis
        loop = asyncio.get_running_loop()
        until = loop.time() + wait
        while True:
            block = min(until - loop.time(), BLOCK_SECONDS)
            found = await redis.xread({key: start}, block=max(1, int(block * 1000)))
            if found or loop.time() >= until - 0.001:
                return found[0][1] if found else []

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
            first = await redis.xrange(stream_key(reply_id), min="-", max="+", count=1)
        except (RedisError, OSError):
            return False
        return bool(first) and first[0][1].get(b"c", b"").decode() == str(chat_id)

    # -- a reply whose process died: the sweeper (`orphans.py`) -------------------------

    async def left_behind(self, chat_id: uuid.UUID) -> LeftReply | None:
        """The chat's latest reply as Redis holds it, if it has a record and no end event:
        what its process logged before it died. None: no such log (never written, or
        expired), or the reply ended. Raises RedisError, OSError, ValueError."""
        redis: Any = self._redis
        value = await redis.get(chat_key(chat_id))
        if not value:
            return None
        reply_id = uuid.UUID(value.decode())
        entries = await redis.xrange(stream_key(reply_id), min="-", max="+")
        if not entries or b"m" not in entries[0][1]:
            return None
        if any(b"e" in fields for _, fields in entries):
            return None
        record = ReplyRecord.decode(bytes(entries[0][1][b"m"]))
        pieces: list[str] = []
        for _, data in _entries(entries, 1):  # after the first event, which names it
            event = orjson.loads(data)
            if event.get("done") is False:
                pieces.append(event["chunk"])
        return LeftReply(reply_id, record, "".join(pieces), _number(entries[-1][0]))

    async def end_left(self, left: LeftReply, event: dict[str, Any]) -> None:
        """Append the end event of a reply settled without its process, so its readers
        see it end; its keys then expire as a finished reply's."""
        number = left.last_event + 1
        end = _script_write(
            (stream_key(left.reply_id), chat_key(left.record.chat_id)),
            f"0-{number}",
            number,
            dumps(event).decode(),
            end=True,
            ttl=self._replay,
            elsewhere=True,
        )
        await self._script(args=[dumps([end])])

    async def aclose(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
        if self._renewal is not None:
            self._renewal.cancel()
        if self._flush is not None:
            with contextlib.suppress(Exception):
                await self._flush
        await self._local.aclose()
        await self._redis.aclose()


@dataclass(eq=False, slots=True)
class RedisReader:
    """A reader of one reply: from this process's memory if it generates the reply (the
    request that asked, almost always; read to the end even if memory drops it
    meanwhile), else from Redis."""

    log: RedisLog
    local: MemoryReader

    async def read(self, after: int, wait: float) -> Batch | None:
        batch = await self.local.read(after, wait)
        if batch is not None:
            return batch
        return await self.log.read_shared(self.local.reply_id, after, wait)


class RedisSignals:
    """Stops announced on the channel `chatmeter:stop`."""

    def __init__(self, client: aioredis.Redis, retry_seconds: float = 1.0) -> None:
        self._redis = client
        self._retry_seconds = retry_seconds

    async def publish(self, reservation_id: uuid.UUID) -> None:
        try:
            await self._redis.publish(STOP_CHANNEL, str(reservation_id))
        except (RedisError, OSError):
            log.warning(
                "could not announce the stop of reservation %s; the poll will", reservation_id
            )

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
