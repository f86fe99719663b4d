"""The async engine: SQLite (WAL, busy timeout, foreign keys) or PostgreSQL."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

# Write transactions on SQLite take the write lock up front (BEGIN IMMEDIATE): a deferred
# transaction that reads and then writes can fail at once with SQLITE_BUSY in WAL mode
# when another writer got in between, which busy_timeout does not cover.
IMMEDIATE = {"sqlite_immediate": True}

# A failed statement's message would otherwise carry its parameters, so chat content
# would reach the logs whenever a write fails
HIDE_PARAMETERS = {"hide_parameters": True}


def make_engine(
    url: str, *, pool_size: int = 10, sqlite_busy_timeout_ms: int = 30_000
) -> AsyncEngine:
    if url.startswith("sqlite"):
        return _sqlite_engine(url, sqlite_busy_timeout_ms)
    return create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size * 2,
        pool_pre_ping=True,
        pool_recycle=1800,
        # fail fast when the server is unreachable instead of asyncpg's 60 s default
        connect_args={"timeout": 5},
        **HIDE_PARAMETERS,
    )


def _sqlite_engine(url: str, busy_timeout_ms: int) -> AsyncEngine:
    engine = create_async_engine(
        url,
        pool_size=8,
        max_overflow=8,
        connect_args={"timeout": busy_timeout_ms / 1000},
        **HIDE_PARAMETERS,
    )

    @sa.event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # the driver must not open transactions by itself: we emit BEGIN below
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cursor.close()

    @sa.event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        immediate = conn.get_execution_options().get("sqlite_immediate", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine
