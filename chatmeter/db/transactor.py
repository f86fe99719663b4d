"""Runs the message path's transactions (`steps.py`) on the configured database."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Callable
from typing import Protocol, TypeVar

import asyncpg

from chatmeter.db.sqlite_writer import (
    MAX_BATCH,
    Job,
    Outcome,
    SqliteWriter,
    commit_batch,
    connect_sqlite,
    resolve,
    sqlite_path,
)
from chatmeter.db.steps import PostgresStatements, Steps, run_asyncpg

T = TypeVar("T")


class Transactor(Protocol):
    async def run(self, steps: Callable[[], Steps[T]]) -> T:
        """Run the transaction `steps()` builds and commit it; roll back and raise if it
        raises. `steps` is a factory so that a retry starts afresh."""
        ...

    async def close(self) -> None: ...


class SqliteTransactor:
    """Runs transactions right on the event loop when the write lock is free, which it
    almost always is: local SQLite statements take microseconds, far less than a hop to
    another thread and back (and the GIL hand-off that comes with it).

    Transactions asked for in the same turn of the loop share one commit (group commit,
    `commit_batch`): a COMMIT writes the WAL, so under load this takes most of the
    commits off the message path, and a caller still hears back only once its writes
    are committed. When another process holds the lock, the batch goes to the writer
    thread, which waits for it there instead of blocking the loop."""

    def __init__(self, url: str, busy_timeout_ms: int) -> None:
        self._path = sqlite_path(url)
        self._writer = SqliteWriter(self._path, busy_timeout_ms)
        self._inline: sqlite3.Connection | None = None
        self._pending: list[Job] = []

    async def run(self, steps: Callable[[], Steps[T]]) -> T:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush)  # after the other tasks of this turn asked too
        self._pending.append((steps, future))
        return await future

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        waited_for = [job for job in pending if not job[1].done()]  # not cancelled since
        for start in range(0, len(waited_for), MAX_BATCH):
            batch = waited_for[start : start + MAX_BATCH]
            try:
                outcomes = self._commit_inline(batch)
            except _LockTaken:
                for job in batch:
                    self._writer.submit(job)
                continue
            except Exception as exc:  # the database itself failed: every job fails
                outcomes = [(False, exc)] * len(batch)
                self._drop_connection()
            resolve(batch, outcomes)

    def _commit_inline(self, batch: list[Job]) -> list[Outcome]:
        if self._inline is None:
            try:
                self._inline = connect_sqlite(self._path, busy_timeout_ms=0)
            except sqlite3.OperationalError as exc:  # its PRAGMAs met another's lock
                raise _LockTaken from exc
        try:
            self._inline.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise _LockTaken from exc
        return commit_batch(self._inline, batch)

    def _drop_connection(self) -> None:
        if self._inline is not None:
            with contextlib.suppress(sqlite3.Error):
                self._inline.close()
            self._inline = None

    async def close(self) -> None:
        self._drop_connection()
        await self._writer.close()


class _LockTaken(Exception):
    """Another connection holds SQLite's write lock: nothing was done."""


class PostgresTransactor:
    """asyncpg itself, with a pool of its own: SQLAlchemy's pool would add a ping per
    checkout, its own BEGIN and a ROLLBACK on return, round trips the message path does
    without."""

    def __init__(self, url: str, pool_size: int = 10) -> None:
        self._dsn = url.replace("postgresql+asyncpg://", "postgresql://", 1)
        self._pool_size = pool_size
        self._pool: asyncpg.Pool | None = None
        self._opening = asyncio.Lock()
        self._statements = PostgresStatements()

    async def run(self, steps: Callable[[], Steps[T]]) -> T:
        pool = self._pool or await self._open()
        async with pool.acquire() as conn, conn.transaction():
            return await run_asyncpg(conn, self._statements, steps())

    async def _open(self) -> asyncpg.Pool:
        async with self._opening:
            if self._pool is None:
                self._pool = await asyncpg.create_pool(
                    self._dsn,
                    min_size=1,
                    max_size=self._pool_size,
                    timeout=5,
                    # every transaction here ends in COMMIT or ROLLBACK and leaves no
                    # session state behind: no reset query on release
                    reset=_nothing_to_reset,
                )
            return self._pool

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None


async def _nothing_to_reset(_: asyncpg.Connection) -> None:
    return None


def make_transactor(url: str, busy_timeout_ms: int) -> Transactor:
    if url.startswith("sqlite"):
        return SqliteTransactor(url, busy_timeout_ms)
    return PostgresTransactor(url)
