"""How a stop reaches the worker that holds the reply (SPEC section 11: within 100 ms,
on any worker or host).

The stop flag in the database stays the source of truth, and every worker still polls
it (`replies.py`): a signal only makes the stop arrive sooner. Three ways, one interface:
- Redis pub/sub when `CHATMETER_REDIS_URL` is set (`redis_log.py`);
- else PostgreSQL `LISTEN`/`NOTIFY` on a connection of its own, which re-checks the
  flags after each reconnect (a notification sent while it was away is lost);
- else (SQLite: one host) nothing: the poll alone.

A stop names the reply by its reservation's id, not its chat's: one that arrives after
its reply ended must find nothing, not the chat's next reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import asyncpg

log = logging.getLogger("chatmeter.signals")

CHANNEL = "chatmeter_stop"
OnStop = Callable[[uuid.UUID], object]
Resync = Callable[[], Awaitable[None]]


class StopSignals(Protocol):
    async def publish(self, reservation_id: uuid.UUID) -> None:
        """Tell every worker that the reply of reservation `reservation_id` is to stop."""

    async def run(self, on_stop: OnStop, resync: Resync) -> None:
        """Listen until cancelled, calling `on_stop` for each stop announced and
        `resync` (re-read the flags) whenever a stop may have been missed."""


class PollOnly:
    """One host without a shared bus: the poll of the flags is all there is."""

    async def publish(self, reservation_id: uuid.UUID) -> None:
        return None

    async def run(self, on_stop: OnStop, resync: Resync) -> None:
        await asyncio.Event().wait()


class PostgresSignals:
    """`NOTIFY chatmeter_stop, '<reservation id>'`, heard by every worker's `LISTEN`."""

    def __init__(self, dsn: str, retry_seconds: float = 1.0) -> None:
        self._dsn = dsn
        self._retry_seconds = retry_seconds
        self._conn: Any = None
        # one query at a time on a connection: the listener's own and every publish
        self._lock = asyncio.Lock()

    async def publish(self, reservation_id: uuid.UUID) -> None:
        try:
            async with self._lock:
                conn = self._conn
                if conn is not None and not conn.is_closed():
                    await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, str(reservation_id))
                    return
            conn = await asyncpg.connect(self._dsn)
            try:
                await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, str(reservation_id))
            finally:
                await conn.close()
        except Exception:
            # the flag is set; the holder's poll will find it
            log.warning(
                "could not announce the stop of reservation %s; the poll will", reservation_id
            )

    async def run(self, on_stop: OnStop, resync: Resync) -> None:
        def heard(_conn: object, _pid: int, _channel: str, payload: str) -> None:
            with contextlib.suppress(ValueError):
                on_stop(uuid.UUID(payload))

        while True:
            try:
                conn = await asyncpg.connect(self._dsn)
            except (OSError, asyncpg.PostgresError):
                await asyncio.sleep(self._retry_seconds)
                continue
            lost = asyncio.Event()
            conn.add_termination_listener(lambda _conn, lost=lost: lost.set())
            try:
                await conn.add_listener(CHANNEL, heard)
                self._conn = conn
                await resync()  # stops announced while nobody listened
                while not lost.is_set():
                    # a connection dropped without a FIN is noticed by a query failing
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(lost.wait(), 30)
                    if not lost.is_set():
                        async with self._lock:
                            await conn.execute("SELECT 1")
            except Exception:
                log.warning("the stop listener lost PostgreSQL; reconnecting")
            finally:
                self._conn = None
                with contextlib.suppress(Exception):
                    await conn.close(timeout=1)
            await asyncio.sleep(self._retry_seconds)
