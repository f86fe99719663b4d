"""Fixtures of the PostgreSQL tests that drive statements on connections of their own."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from tests.support.postgres import PostgresServer


@pytest.fixture
async def dsn(postgres: PostgresServer, postgres_template: str) -> str:
    """A fresh migrated database of the session's server, for asyncpg."""
    name = f"c_{uuid.uuid4().hex[:12]}"
    postgres.createdb(name, postgres_template)
    return postgres.url(name).replace("postgresql+asyncpg://", "postgresql://", 1)


@pytest.fixture
async def conns(dsn: str) -> AsyncIterator[list[asyncpg.Connection]]:
    """Three connections to `dsn`: two that race, one that watches."""
    opened = [await asyncpg.connect(dsn) for _ in range(3)]
    try:
        yield opened
    finally:
        for conn in opened:
            await conn.close()
