"""The PostgreSQL transactor's connections: never more than its size, lent one at a time,
given back unless the borrower was cancelled or left a transaction open, and a borrower
who stops waiting passes its turn on."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from chatmeter.db.pg_connections import UNTRUSTED, Connections
from tests.support.postgres import PostgresServer
from tests.support.waiting import eventually


@pytest.fixture
async def dsn(postgres: PostgresServer) -> str:
    name = f"c_{uuid.uuid4().hex[:12]}"
    postgres.createdb(name)
    return postgres.url(name).replace("postgresql+asyncpg://", "postgresql://", 1)


@pytest.fixture
async def connections(dsn: str) -> AsyncIterator[Connections]:
    lending = Connections(dsn, size=2)
    try:
        yield lending
    finally:
        await lending.close()


async def backend_pid(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT pg_backend_pid()"))


async def test_at_most_size_at_once_and_the_next_borrower_waits(
    connections: Connections,
) -> None:
    first, second = await connections.acquire(), await connections.acquire()
    third = asyncio.ensure_future(connections.acquire())
    await asyncio.sleep(0)  # it waits in line: both places are taken
    assert not third.done()
    pid = await backend_pid(first)
    connections.release(first, reusable=True)
    handed = await third
    assert await backend_pid(handed) == pid  # the same connection, not a third one
    connections.release(second, reusable=True)
    connections.release(handed, reusable=True)


async def test_a_connection_left_in_a_transaction_or_cancelled_is_not_lent_again(
    connections: Connections,
) -> None:
    conn = await connections.acquire()
    pid = await backend_pid(conn)
    await conn.execute("BEGIN")
    connections.release(conn, reusable=True)
    assert conn.is_closed()
    again = await connections.acquire()
    assert not again.is_in_transaction() and await backend_pid(again) != pid
    # a borrower cancelled mid-query: its query may still be cancelling
    slow = asyncio.ensure_future(_sleep_in_the_database(connections))
    await eventually(lambda: _sleeping(again))
    slow.cancel()
    with pytest.raises(asyncio.CancelledError):
        await slow
    connections.release(again, reusable=True)
    fresh = await connections.acquire()
    assert await fresh.fetchval("SELECT 1") == 1
    connections.release(fresh, reusable=True)


async def _sleep_in_the_database(connections: Connections) -> None:
    async with connections.lend() as conn:
        await conn.execute("SELECT pg_sleep(30)")


async def _sleeping(conn: asyncpg.Connection) -> bool:
    query = "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)'"
    return bool(await conn.fetchval(query))


async def test_a_borrower_who_stops_waiting_passes_its_turn_on(dsn: str) -> None:
    lending = Connections(dsn, size=1)
    try:
        held = await lending.acquire()
        gives_up = asyncio.ensure_future(lending.acquire())
        waits = asyncio.ensure_future(lending.acquire())
        await asyncio.sleep(0)
        gives_up.cancel()
        lending.release(held, reusable=True)
        handed = await asyncio.wait_for(waits, 10)
        assert await handed.fetchval("SELECT 1") == 1
        # a connection that failed is forgotten and its place made again for the next
        lending.release(handed, reusable=False)
        assert handed.is_closed()
        async with lending.lend() as conn:
            assert await conn.fetchval("SELECT 2") == 2
    finally:
        await lending.close()


async def test_a_connection_the_server_closed_is_replaced(
    connections: Connections, postgres: PostgresServer, dsn: str
) -> None:
    async with connections.lend() as conn:
        pid = await backend_pid(conn)
    killer = await asyncpg.connect(dsn)
    try:
        assert await killer.fetchval("SELECT pg_terminate_backend($1)", pid)
    finally:
        await killer.close()
    # the dead one is seen closed and passed over, or fails the one transaction that
    # finds it dead (whichever comes first: the server's farewell arrives on its own);
    # either way it is not lent again
    with contextlib.suppress(asyncpg.PostgresError, *UNTRUSTED):
        async with connections.lend() as conn:
            await conn.fetchval("SELECT 1")
    async with connections.lend() as conn:
        assert await backend_pid(conn) != pid
