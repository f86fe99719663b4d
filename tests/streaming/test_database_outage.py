"""The database goes away at settlement: the stream ends with DATABASE_ERROR, and the
usage is recorded once the database is back, exactly once (SPEC section 5, issue 7)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx

from chatmeter.db.engine import make_engine
from chatmeter.db.transactor import make_transactor
from chatmeter.metering.outbox import Outbox
from chatmeter.metering.settlement import Settlement
from chatmeter.providers.base import Usage
from tests.conftest import auth, make_settings, scripted, token_for
from tests.streaming.test_exchange import new_chat
from tests.support.db import books, chat_rows, ledger_row
from tests.support.outage import DatabaseOutage, opening_answer_lost
from tests.support.postgres import PostgresServer
from tests.support.server import serve
from tests.support.sse import StreamResult, parse_events, stream_message
from tests.support.waiting import eventually

SLOW = scripted(reply="one two three four five six seven eight", chunks=8, delay_ms=60)


async def test_settlement_survives_a_database_outage(database_url: str, tmp_path: Path) -> None:
    async with DatabaseOutage(database_url) as outage:
        settings = make_settings(
            outage.url,
            models={"slow": SLOW},
            settle_retry_seconds=0.3,
            sqlite_busy_timeout_ms=100,
            outbox_dir=str(tmp_path / "outbox"),
        )
        async with serve(settings) as server:
            services = server.services
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
                chat_id = await new_chat(client, "olga", model="slow")
                result = StreamResult(0, httpx.Headers())
                async with client.stream(
                    "POST",
                    f"/api/chat/{chat_id}/message",
                    json={"message": "hi"},
                    headers=auth("olga"),
                ) as response:
                    async for event in parse_events(response.aiter_lines(), result):
                        if len(result.chunks) == 2 and not outage_started(outage):
                            outage.begin()
                        if event.get("done") or event.get("error"):
                            break
                error = result.last
                assert error["error"] is True and error["code"] == "DATABASE_ERROR"
                assert error["tokens_used"] > 0
                assert result.text == SLOW.reply  # the reply itself was complete
                assert services.outbox.pending() == 1

                outage.end()
                await eventually(lambda: services.outbox.pending() == 0, within=15)

                rows = await chat_rows(server.engine, chat_id)
                assert [(r.role, r.status) for r in rows] == [
                    ("user", "complete"),
                    ("assistant", "complete"),
                ]
                assert str(rows[1].message_id) == error["message_id"]
                assert rows[1].content == SLOW.reply
                assert rows[1].tokens_consumed == error["tokens_used"]
                state = await books(server.engine, "olga")
                assert state.total == state.ledger == error["tokens_used"]
                assert state.ledger_rows == 1
                assert state.reserved == 0 and state.open_reservations == 0
                # replaying again (a crash between replay and rewrite) bills nothing twice
                spool = services.outbox.path.read_bytes()
                assert spool == b""
                # and the chat works again
                again = await client.post(
                    f"/api/chat/{chat_id}/message",
                    json={"message": "again"},
                    headers={"Authorization": f"Bearer {token_for('olga')}"},
                )
                assert again.status_code == 200


def outage_started(outage: DatabaseOutage) -> bool:
    return outage._lock is not None or (outage._proxy is not None and outage._proxy.down)


async def test_replaying_twice_bills_once(database_url: str, tmp_path: Path) -> None:
    async with serve(make_settings(database_url, outbox_dir=str(tmp_path / "o"))) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            chat_id = await new_chat(client, "pia")
            done = await stream_message(client, chat_id, "hello", token_for("pia"))
            assert done.last["done"] is True
    # spool the same settlement a second time, as if a replay crashed before its rewrite
    engine = make_engine(database_url)
    try:
        before = await books(engine, "pia")
        row = await ledger_row(engine, done.last["message_id"])
        assert row is not None
        rows = await chat_rows(engine, chat_id)
        duplicate = Settlement(
            user_id="pia",
            chat_id=rows[1].chat_id,
            model="scripted",
            reservation_id=rows[1].message_id,
            message_id=rows[1].message_id,
            content=rows[1].content,
            status="complete",
            finish_reason="stop",
            usage=Usage(row.prompt_tokens, row.completion_tokens),
            source="provider",
            created_at=rows[1].created_at,
        )
        outbox = Outbox(str(tmp_path / "o2"), "w1")
        outbox.append(duplicate)
        transactor = make_transactor(database_url, 1000)
        try:
            assert await outbox.replay(transactor) == 1
        finally:
            await transactor.close()
        after = await books(engine, "pia")
        assert after == before
    finally:
        await engine.dispose()


async def test_a_message_while_the_database_is_away_is_503_and_changes_nothing(
    database_url: str, tmp_path: Path
) -> None:
    async with DatabaseOutage(database_url) as outage:
        settings = make_settings(
            outage.url, sqlite_busy_timeout_ms=100, outbox_dir=str(tmp_path / "outbox")
        )
        async with serve(settings) as server:
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
                chat_id = await new_chat(client, "quinn")
                outage.begin()
                refused = await client.post(
                    f"/api/chat/{chat_id}/message", json={"message": "hi"}, headers=auth("quinn")
                )
                outage.end()
                assert refused.status_code == 503
                assert refused.headers["retry-after"] == "1"
                assert refused.json()["code"] == "DATABASE_ERROR"
                assert await chat_rows(server.engine, chat_id) == []
                # nothing was reserved: the next message has the whole budget and streams
                done = await stream_message(client, chat_id, "hi again", token_for("quinn"))
                assert done.last["done"] is True
                state = await books(server.engine, "quinn")
                assert state.reserved == 0 and state.total == state.ledger


async def test_a_message_whose_postgres_backend_is_terminated_opens_on_a_new_connection(
    postgres: PostgresServer, postgres_template: str
) -> None:
    # a PostgreSQL restart (or failover, or pg_terminate_backend) ends every backend with
    # FATAL 57P01 "terminating connection due to administrator command" (asyncpg: the
    # connection does not exist). The opening in flight may have committed or not: it
    # is taken back if it did (here it had not), and opened again on a new connection
    name = f"t_{uuid.uuid4().hex[:12]}"
    postgres.createdb(name, postgres_template)
    url = postgres.url(name)
    dsn = url.replace("postgresql+asyncpg://", "postgresql://", 1)
    async with serve(make_settings(url)) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            chat_id = await new_chat(client, "tess")
            first = await stream_message(client, chat_id, "hello", token_for("tess"))
            assert first.last["done"] is True
            before = await books(server.engine, "tess")
            rows_before = await chat_rows(server.engine, chat_id)
            holder = await asyncpg.connect(dsn)
            try:
                # the opening's reservation waits for the user's row, locked here
                await holder.execute("BEGIN")
                await holder.execute("SELECT 1 FROM user_usage WHERE user_id = 'tess' FOR UPDATE")
                asked = asyncio.ensure_future(
                    client.post(
                        f"/api/chat/{chat_id}/message", json={"message": "hi"}, headers=auth("tess")
                    )
                )
                await terminate_the_waiting_backend(holder, name)
                await holder.execute("ROLLBACK")
            finally:
                await holder.close()
            answered = await asked
            assert answered.status_code == 200, answered.text
            assert '"done":true' in answered.text
            rows = await chat_rows(server.engine, chat_id)
            assert [(r.role, r.content) for r in rows[len(rows_before) :]][:1] == [("user", "hi")]
            assert [r.role for r in rows[len(rows_before) :]] == ["user", "assistant"]
            state = await books(server.engine, "tess")
            assert state.reserved == 0 and state.open_reservations == 0
            assert state.total == state.ledger and state.ledger_rows == before.ledger_rows + 1


async def test_an_opening_whose_answer_postgres_never_sent_leaves_no_stuck_chat(
    postgres: PostgresServer, postgres_template: str
) -> None:
    # On PostgreSQL the opening's reservation and user message are one statement run
    # alone: it commits as it ends. A connection lost between that and its answer (a
    # network or a pooler failing) left the chat held by a reservation nobody would
    # settle: 409 for every message until the lease ran out. Taken back, as the SQLite
    # writer process's death is, the message is opened again and streams.
    async with opening_answer_lost(postgres, postgres_template) as (url, proxy):
        settings = make_settings(url, reservation_ttl_seconds=600)
        async with serve(settings) as server:
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
                chat_id = await new_chat(client, "lou")
                # the user's row exists (the common case: not the first message ever)
                assert (await client.get("/api/usage", headers=auth("lou"))).status_code == 200
                result = await stream_message(client, chat_id, "hello", token_for("lou"))
                assert proxy.lost == 1
                assert result.status == 200, result.body
                assert result.last.get("done") is True
                rows = await chat_rows(server.engine, chat_id)
                assert [(r.role, r.content) for r in rows][:1] == [("user", "hello")]
                assert [r.role for r in rows] == ["user", "assistant"]  # the lost one undone
                again = await stream_message(client, chat_id, "again", token_for("lou"))
                assert again.status == 200, again.body
                state = await books(server.engine, "lou")
                assert state.reserved == 0 and state.open_reservations == 0
                billed = result.last["tokens_used"] + again.last["tokens_used"]
                assert state.total == state.ledger == billed


@contextlib.asynccontextmanager
async def database_with_role(
    postgres: PostgresServer, template: str, role_options: str
) -> AsyncIterator[tuple[asyncpg.Connection, str, uuid.UUID]]:
    """A fresh database, a role of its own made with `role_options`, and a chat of
    user "una": the database's owner's connection, chatmeter's URL as that role, the
    chat's id."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    role = f"r_{uuid.uuid4().hex[:12]}"
    postgres.createdb(name, template)
    parts = urlsplit(postgres.url(name))
    admin = await asyncpg.connect(postgres.url(name).replace("+asyncpg", "", 1))
    try:
        await admin.execute(f"CREATE ROLE {role} LOGIN {role_options}")
        await admin.execute(f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {role}")
        chat_id = uuid.uuid4()
        await admin.execute(
            "INSERT INTO chats (chat_id, user_id, title, model, is_active, created_at, "
            "updated_at) VALUES ($1, 'una', 't', 'scripted', true, now(), now())",
            chat_id,
        )
        yield (
            admin,
            urlunsplit(parts._replace(netloc=f"{role}@{parts.netloc.split('@')[-1]}")),
            chat_id,
        )
    finally:
        await admin.execute(f"DROP OWNED BY {role}")
        await admin.execute(f"DROP ROLE {role}")
        await admin.close()


async def terminate_the_waiting_backend(holder: asyncpg.Connection, database: str) -> None:
    """End the backend of `database` that waits for a lock `holder` holds, once it waits
    (as a restart or a failover ends it)."""
    waiting: list[int] = []

    async def a_backend_waits() -> bool:
        # `holder` is in its transaction, and PostgreSQL shows a transaction the sessions
        # of pg_stat_activity as they were when it first looked (their wait events live,
        # the rows not): a backend connected after that look (the server makes its
        # connections when first needed) was never seen, and the wait timed out
        await holder.execute("SELECT pg_stat_clear_snapshot()")
        waiting[:] = (
            await holder.fetchval(
                "SELECT array_agg(pid) FROM pg_stat_activity WHERE datname = $1 "
                "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()",
                database,
            )
            or []
        )
        return bool(waiting)

    await eventually(a_backend_waits, within=20)
    assert await holder.fetchval("SELECT pg_terminate_backend($1)", waiting[0])


async def assert_503(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.json()["code"] == "DATABASE_ERROR"
    assert response.headers["retry-after"] == "1"


async def test_a_message_when_postgres_takes_no_more_connections_is_503(
    postgres: PostgresServer, postgres_template: str
) -> None:
    # PostgreSQL out of connections (max_connections, or a role's or a database's limit,
    # reached: 53300 "too many connections") is a database that cannot serve now, as
    # one restarting is: 503 with Retry-After, not a 500
    async with database_with_role(postgres, postgres_template, "CONNECTION LIMIT 1") as (
        admin,
        url,
        chat_id,
    ):
        limited = await asyncpg.connect(url.replace("+asyncpg", "", 1))
        try:  # the role's one connection is this one
            async with serve(make_settings(url)) as server:
                async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
                    await assert_503(
                        await client.post(
                            f"/api/chat/{chat_id}/message",
                            json={"message": "hi"},
                            headers=auth("una"),
                        )
                    )
                    await assert_503(await client.get("/api/usage", headers=auth("una")))
        finally:
            await limited.close()
        assert await admin.fetchval("SELECT count(*) FROM messages") == 0


async def test_a_message_past_the_statement_timeout_is_503(
    postgres: PostgresServer, postgres_template: str
) -> None:
    # a statement_timeout (or a cancel from an operator) ends the statement with 57014
    # "canceling statement due to statement timeout": nothing was written, try again
    async with database_with_role(postgres, postgres_template, "CONNECTION LIMIT 20") as (
        admin,
        url,
        chat_id,
    ):
        await admin.execute(f"ALTER ROLE {urlsplit(url).username} SET statement_timeout = '200ms'")
        async with serve(make_settings(url)) as server:
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
                async with admin.transaction():
                    await admin.execute("LOCK TABLE user_usage IN ACCESS EXCLUSIVE MODE")
                    refused = await client.post(
                        f"/api/chat/{chat_id}/message", json={"message": "hi"}, headers=auth("una")
                    )
                await assert_503(refused)
                assert await admin.fetchval("SELECT count(*) FROM messages") == 0
                done = await stream_message(client, str(chat_id), "hi", token_for("una"))
                assert done.last["done"] is True


async def test_a_transaction_whose_postgres_backend_is_terminated_is_503(
    postgres: PostgresServer, postgres_template: str
) -> None:
    # the backend ended in the middle of a transaction (BEGIN sent, a statement waiting):
    # asyncpg's transaction then fails to roll back on the closed connection, and that
    # error (InterfaceError) hid the connection's loss, answered 500
    name = f"t_{uuid.uuid4().hex[:12]}"
    postgres.createdb(name, postgres_template)
    url = postgres.url(name)
    admin = auth("root", admin=True)
    async with serve(make_settings(url)) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            holder = await asyncpg.connect(url.replace("+asyncpg", "", 1))
            try:
                async with holder.transaction():
                    await holder.execute("LOCK TABLE user_usage IN ACCESS EXCLUSIVE MODE")
                    asked = asyncio.ensure_future(
                        client.put(
                            "/api/admin/users/ivy/limit", json={"token_limit": 500}, headers=admin
                        )
                    )
                    await terminate_the_waiting_backend(holder, name)
            finally:
                await holder.close()
            await assert_503(await asked)
            again = await client.put(
                "/api/admin/users/ivy/limit", json={"token_limit": 500}, headers=admin
            )
            assert again.status_code == 200, again.text
            assert again.json()["token_limit"] == 500
