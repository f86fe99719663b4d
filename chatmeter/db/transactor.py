"""Runs the message path's transactions (`steps.py`) on the configured database."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from typing import Protocol, TypeVar

import asyncpg

from chatmeter.db.sqlite_writer import SqliteWriter, connect_sqlite, sqlite_path
from chatmeter.db.steps import PostgresStatements, Steps, run_asyncpg, run_sqlite

T = TypeVar("T")


class Transactor(Protocol):
    async def run(self, steps: Callable[[], Steps[T]]) -> T:
        """Run the transaction `steps()` builds and commit it; roll back and raise if it
        raises. `steps` is a factory so that a retry starts afresh."""
        ...

    async def close(self) -> None: ...


class SqliteTransactor:
    """Runs a transaction right on the event loop when the write lock is free, which it
    almost always is: local SQLite statements take microseconds, far less than a hop to
    another thread and back (and the GIL hand-off that comes with it). When another
    process holds the lock, the transaction goes to the writer thread, which waits for
    it there instead of blocking the loop."""

    def __init__(self, url: str, busy_timeout_ms: int) -> None:
        self._path = sqlite_path(url)
        self._writer = SqliteWriter(self._path, busy_timeout_ms)
        self._inline: sqlite3.Connection | None = None

    async def run(self, steps: Callable[[], Steps[T]]) -> T:
        try:
            return self._run_inline(steps)
        except _LockTaken:
            return await self._writer.run(steps)

    def _run_inline(self, steps: Callable[[], Steps[T]]) -> T:
        if self._inline is None:
            try:
                self._inline = connect_sqlite(self._path, busy_timeout_ms=0)
            except sqlite3.OperationalError as exc:  # its PRAGMAs met another's lock
                raise _LockTaken from exc
        conn = self._inline
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise _LockTaken from exc
        try:
            result = run_sqlite(conn, steps())
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return result

    async def close(self) -> None:
        if self._inline is not None:
            self._inline.close()
            self._inline = None
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
