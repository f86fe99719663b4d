"""Runs the message path's transactions (`steps.py`) on the configured database."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from sqlalchemy.ext.asyncio import AsyncEngine

from chatmeter.db.sqlite_writer import SqliteWriter, sqlite_path
from chatmeter.db.steps import PostgresStatements, Steps, run_asyncpg

T = TypeVar("T")


class Transactor(Protocol):
    async def run(self, steps: Callable[[], Steps[T]]) -> T:
        """Run the transaction `steps()` builds and commit it; roll back and raise if it
        raises. `steps` is a factory so that a retry starts afresh."""
        ...

    async def close(self) -> None: ...


class SqliteTransactor:
    def __init__(self, url: str, busy_timeout_ms: int) -> None:
        self._writer = SqliteWriter(sqlite_path(url), busy_timeout_ms)

    async def run(self, steps: Callable[[], Steps[T]]) -> T:
        return await self._writer.run(steps)

    async def close(self) -> None:
        await self._writer.close()


class PostgresTransactor:
    """asyncpg itself, on connections of the engine's pool."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._statements = PostgresStatements()

    async def run(self, steps: Callable[[], Steps[T]]) -> T:
        async with self._engine.connect() as conn:
            fairy = await conn.get_raw_connection()
            raw: Any = fairy.driver_connection
            async with raw.transaction():
                return await run_asyncpg(raw, self._statements, steps())

    async def close(self) -> None:
        return None


def make_transactor(url: str, engine: AsyncEngine, busy_timeout_ms: int) -> Transactor:
    if url.startswith("sqlite"):
        return SqliteTransactor(url, busy_timeout_ms)
    return PostgresTransactor(engine)
