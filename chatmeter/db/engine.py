"""A short-lived SQLAlchemy engine for the Alembic migrations (and for tools and tests
that read the database as an auditor would). The application's own queries never come
here: they are steps (`steps.py`) run by the transactor (`transactor.py`)."""

from __future__ import annotations

from functools import partial

import aiosqlite
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from chatmeter.db.sqlite_process import connect_sqlite, sqlite_path

# A failed statement's message would otherwise carry its parameters
HIDE_PARAMETERS = {"hide_parameters": True}


def make_engine(url: str, *, sqlite_busy_timeout_ms: int = 30_000) -> AsyncEngine:
    """An engine with no pool to keep: each connection closes when it is returned."""
    if not url.startswith("sqlite"):
        # fail fast when the server is unreachable instead of asyncpg's 60 s default
        return create_async_engine(
            url, poolclass=NullPool, connect_args={"timeout": 5}, **HIDE_PARAMETERS
        )
    connector = partial(connect_sqlite, sqlite_path(url), sqlite_busy_timeout_ms)

    async def connect() -> aiosqlite.Connection:
        # set up as the transactor's connections are: the PRAGMAs are written once
        return await aiosqlite.Connection(connector, iter_chunk_size=64)

    engine = create_async_engine(url, poolclass=NullPool, async_creator=connect, **HIDE_PARAMETERS)

    @sa.event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        # the connection leaves transactions to its user (isolation_level None)
        conn.exec_driver_sql("BEGIN")

    return engine
