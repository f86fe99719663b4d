"""PostgreSQL plans the opening's read of a chat's last messages along the index, whatever
the statistics of the moment it planned it (`pg_connections.PLANNER_SETTINGS`); a wide
read (a report, a search) may still scan a table."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import asyncpg
import pytest

from chatmeter.db.pg_connections import Connections
from chatmeter.db.steps import Sql, Steps
from chatmeter.db.tables import utcnow
from chatmeter.db.transactor import PostgresTransactor
from chatmeter.ids import new_id
from chatmeter.streaming.opening import LATEST_MESSAGES
from tests.support.postgres import PostgresServer

CHATS = 50
PER_CHAT = 10  # the averages at which a generic plan stops using the index
HISTORY = "SELECT role, content " + LATEST_MESSAGES.replace(":chat_id", "$1").replace(
    ":count", "10"
)


@pytest.fixture
async def dsn(postgres: PostgresServer, postgres_template: str) -> AsyncIterator[str]:
    name = f"p_{uuid.uuid4().hex[:12]}"
    postgres.createdb(name, postgres_template)
    dsn = postgres.url(name).replace("postgresql+asyncpg://", "postgresql://", 1)
    conn = await asyncpg.connect(dsn)
    try:
        now = utcnow()
        for _ in range(CHATS):
            chat_id = new_id()
            await conn.execute(
                "INSERT INTO chats (chat_id, user_id, title, model, is_active, created_at, "
                "updated_at) VALUES ($1, 'u', 't', 'm', true, $2, $2)",
                chat_id,
                now,
            )
            await conn.executemany(
                "INSERT INTO messages (message_id, chat_id, role, content, tokens_consumed, "
                "status, created_at) VALUES ($1, $2, $3, 'words', 0, 'complete', $4)",
                [
                    (new_id(), chat_id, "user" if i % 2 == 0 else "assistant", now + timedelta(i))
                    for i in range(PER_CHAT)
                ],
            )
        await conn.execute("ANALYZE")
    finally:
        await conn.close()
    yield dsn


async def generic_plan(conn: asyncpg.Connection) -> str:
    """The plan PostgreSQL keeps for the history read once it stops planning per call."""
    await conn.execute("SET plan_cache_mode = force_generic_plan")
    await conn.execute(f"PREPARE history(uuid) AS {HISTORY}")
    rows = await conn.fetch(f"EXPLAIN EXECUTE history('{uuid.uuid4()}')")
    await conn.execute("DEALLOCATE history")
    return "\n".join(row[0] for row in rows)


async def test_the_history_read_walks_the_index_whatever_the_statistics(dsn: str) -> None:
    # the control: on a connection as PostgreSQL makes it, these statistics plan a scan
    # of all the chat's rows and a sort (the plan a long chat pays for at every message)
    plain = await asyncpg.connect(dsn)
    try:
        control = await generic_plan(plain)
        assert "Index Scan Backward" not in control and "Sort" in control, control
    finally:
        await plain.close()
    connections = Connections(dsn, size=1)
    try:
        async with connections.lend() as conn:
            plan = await generic_plan(conn)
    finally:
        await connections.close()
    assert "Index Scan Backward using ix_messages_in_order on messages" in plan, plan
    assert "Bitmap" not in plan and "Seq Scan" not in plan, plan


def explain(sql: str, *, wide: bool) -> Steps[str]:
    rows = yield Sql(f"EXPLAIN {sql}", {"pattern": "%a%"}, alone=True, wide=wide)
    return "\n".join(str(row[0]) for row in rows)


async def test_a_wide_read_may_scan_the_table_and_the_next_statement_may_not(dsn: str) -> None:
    search = "SELECT COUNT(*) FROM messages WHERE lower(content) LIKE :pattern"
    penalty = "cost=10000000"  # what PostgreSQL adds to a plan its settings turn off
    transactor = PostgresTransactor(dsn, pool_size=1)  # one connection: the same session
    try:
        wide = await transactor.run(explain, search, wide=True)
        # the settings were the wide statement's transaction's only
        narrow = await transactor.run(explain, search, wide=False)
    finally:
        await transactor.close()
    assert "Seq Scan on messages" in wide and penalty not in wide, wide
    assert penalty in narrow, narrow  # no index serves it: the scan, at the penalty
    assert "JIT" not in narrow, narrow  # which would otherwise compile it at every run
