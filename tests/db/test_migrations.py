"""The Alembic migrations on SQLite and PostgreSQL: the SPEC section 7 schema, both ways."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.ext.asyncio import AsyncEngine

from chatmeter.db.engine import make_engine
from chatmeter.db.migrate import alembic_config, upgrade
from chatmeter.db.tables import metadata
from tests.support.postgres import PostgresServer

SPEC_COLUMNS = {
    "chats": {"chat_id", "user_id", "title", "model", "is_active", "created_at", "updated_at"},
    "messages": {
        "message_id",
        "chat_id",
        "role",
        "content",
        "tokens_consumed",
        "status",
        "prompt_tokens",
        "completion_tokens",
        "metering_source",
        "finish_reason",
        "created_at",
    },
    "user_usage": {
        "user_id",
        "total_tokens_used",
        "token_limit",
        "reserved_tokens",
        "updated_at",
    },
    "usage_events": {
        "event_id",
        "user_id",
        "chat_id",
        "message_id",
        "model",
        "prompt_tokens",
        "completion_tokens",
        "thinking_tokens",
        "cached_tokens",
        "total_tokens",
        "source",
        "created_at",
    },
}
# SPEC section 10: plans, periods, spend, rate limits and cost
PLAN_COLUMNS = {
    "messages": {"cost_micros"},
    "usage_events": {"cost_micros"},
    "user_usage": {
        "plan",
        "token_limit_overridden",
        "period_start",
        "spend_micros",
        "reserved_micros",
        "active_replies",
        "rate_tat",
    },
}
PRIMARY_KEYS = {
    "chats": ["chat_id"],
    "messages": ["message_id"],
    "user_usage": ["user_id"],
    "usage_events": ["event_id"],
}


@pytest.fixture
def empty_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database with nothing in it (not the migrated template)."""
    if backend == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}"
    postgres: PostgresServer = request.getfixturevalue("postgres")
    name = f"e_{uuid.uuid4().hex[:12]}"
    postgres.createdb(name)
    return postgres.url(name)


@pytest.fixture
async def engine(empty_url: str) -> AsyncIterator[AsyncEngine]:
    engine = make_engine(empty_url)
    try:
        yield engine
    finally:
        await engine.dispose()


async def run_alembic(operation: Any, url: str, revision: str) -> None:
    # Alembic's env.py runs its own event loop: keep it off this one
    await asyncio.to_thread(operation, alembic_config(url), revision)


async def inspect(engine: AsyncEngine) -> dict[str, Any]:
    def read(connection: sa.Connection) -> dict[str, Any]:
        inspector = sa.inspect(connection)
        tables = {}
        for table in inspector.get_table_names():
            tables[table] = {
                "columns": {c["name"]: c for c in inspector.get_columns(table)},
                "pk": inspector.get_pk_constraint(table)["constrained_columns"],
                "fks": inspector.get_foreign_keys(table),
                "unique": inspector.get_unique_constraints(table),
                "indexes": inspector.get_indexes(table),
            }
        return tables

    async with engine.connect() as conn:
        return await conn.run_sync(read)


async def schema_differences(engine: AsyncEngine) -> list[Any]:
    def compare(connection: sa.Connection) -> list[Any]:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return list(compare_metadata(context, metadata))

    async with engine.connect() as conn:
        return await conn.run_sync(compare)


async def test_upgrade_from_empty_creates_the_spec_tables(
    empty_url: str, engine: AsyncEngine, backend: str
) -> None:
    assert await inspect(engine) == {}
    await run_alembic(command.upgrade, empty_url, "head")
    tables = await inspect(engine)
    assert set(SPEC_COLUMNS) <= set(tables)
    assert "alembic_version" in tables
    for table, columns in SPEC_COLUMNS.items():
        assert set(tables[table]["columns"]) == columns | PLAN_COLUMNS.get(table, set()), table
        assert tables[table]["pk"] == PRIMARY_KEYS[table], table
    fks = tables["messages"]["fks"]
    assert [(fk["constrained_columns"], fk["referred_table"]) for fk in fks] == [
        (["chat_id"], "chats")
    ]
    unique = {tuple(u["column_names"]) for u in tables["usage_events"]["unique"]}
    unique |= {tuple(i["column_names"]) for i in tables["usage_events"]["indexes"] if i["unique"]}
    assert ("message_id",) in unique, "an exchange is billed once"
    nullable = {name for name, c in tables["messages"]["columns"].items() if c["nullable"]}
    assert nullable == {"prompt_tokens", "completion_tokens", "metering_source", "finish_reason"}
    for table in ("chats", "user_usage"):
        assert not any(c["nullable"] for c in tables[table]["columns"].values()), table
    nullable = {name for name, c in tables["usage_events"]["columns"].items() if c["nullable"]}
    assert nullable == {"chat_id"}, "only an exchange of /v1 has no chat"
    if backend == "postgres":
        chats = tables["chats"]["columns"]
        assert isinstance(chats["chat_id"]["type"], sa.Uuid)
        assert isinstance(chats["is_active"]["type"], sa.Boolean)
        assert chats["created_at"]["type"].timezone is True
        assert isinstance(tables["user_usage"]["columns"]["token_limit"]["type"], sa.BigInteger)
    async with engine.connect() as conn:
        version = (await conn.execute(sa.text("SELECT version_num FROM alembic_version"))).all()
    head = ScriptDirectory.from_config(alembic_config(empty_url)).get_current_head()
    assert version == [(head,)]


async def test_migrated_schema_matches_the_tables_module(
    empty_url: str, engine: AsyncEngine
) -> None:
    await run_alembic(command.upgrade, empty_url, "head")
    assert await schema_differences(engine) == []


async def test_downgrade_to_base_and_upgrade_again(empty_url: str, engine: AsyncEngine) -> None:
    await run_alembic(command.upgrade, empty_url, "head")
    async with engine.begin() as conn:
        await conn.execute(
            sa.text(
                "INSERT INTO user_usage (user_id, total_tokens_used, token_limit,"
                " reserved_tokens, updated_at) VALUES ('u', 0, 5, 0, CURRENT_TIMESTAMP)"
            )
        )
    await run_alembic(command.downgrade, empty_url, "base")
    assert set(await inspect(engine)) <= {"alembic_version"}
    await run_alembic(command.upgrade, empty_url, "head")
    tables = await inspect(engine)
    assert set(SPEC_COLUMNS) <= set(tables)
    assert await schema_differences(engine) == []
    async with engine.connect() as conn:
        rows = (await conn.execute(sa.text("SELECT count(*) FROM user_usage"))).scalar_one()
    assert rows == 0


async def test_upgrade_helper_is_idempotent_inside_a_running_loop(
    empty_url: str, engine: AsyncEngine
) -> None:
    upgrade(empty_url)  # from inside this event loop: runs in a thread of its own
    upgrade(empty_url)
    assert await schema_differences(engine) == []


async def test_downgrade_keeps_chatless_ledger_rows_and_hands_back_their_reservations(
    empty_url: str, engine: AsyncEngine
) -> None:
    """Below 0003 there is no null chat_id: a /v1 ledger row keeps its tokens under the
    nil chat id, and a /v1 reservation in flight gives its tokens back."""
    await run_alembic(command.upgrade, empty_url, "0003_api_keys")
    ids = {"e": uuid.uuid4(), "m": uuid.uuid4(), "r": uuid.uuid4(), "c": uuid.uuid4()}
    async with engine.begin() as conn:
        await conn.execute(
            sa.text(
                "INSERT INTO user_usage (user_id, total_tokens_used, token_limit,"
                " reserved_tokens, updated_at) VALUES ('u', 7, 100, 30, CURRENT_TIMESTAMP)"
            )
        )
        await conn.execute(
            sa.text(
                "INSERT INTO usage_events (event_id, user_id, chat_id, message_id, model,"
                " prompt_tokens, completion_tokens, thinking_tokens, cached_tokens,"
                " total_tokens, source, created_at) VALUES (:e, 'u', NULL, :m, 'x', 5, 2, 0,"
                " 0, 7, 'provider', CURRENT_TIMESTAMP)"
            ).bindparams(sa.bindparam("e", type_=sa.Uuid()), sa.bindparam("m", type_=sa.Uuid())),
            {"e": ids["e"], "m": ids["m"]},
        )
        for reservation, chat, tokens in ((ids["r"], None, 20), (uuid.uuid4(), ids["c"], 10)):
            await conn.execute(
                sa.text(
                    "INSERT INTO reservations (reservation_id, user_id, chat_id, tokens,"
                    " worker_id, stop_requested, expires_at, created_at) VALUES (:r, 'u', :c,"
                    " :t, 'w', false, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
                ).bindparams(
                    sa.bindparam("r", type_=sa.Uuid()), sa.bindparam("c", type_=sa.Uuid())
                ),
                {"r": reservation, "c": chat, "t": tokens},
            )
    await run_alembic(command.downgrade, empty_url, "0001")
    async with engine.connect() as conn:
        ledger = (await conn.execute(sa.text("SELECT total_tokens FROM usage_events"))).all()
        reserved = (
            await conn.execute(sa.text("SELECT reserved_tokens FROM user_usage"))
        ).scalar_one()
        left = (await conn.execute(sa.text("SELECT tokens FROM reservations"))).all()
    assert ledger == [(7,)]
    assert reserved == 10
    assert left == [(10,)]


async def test_downgrade_to_plans_hands_back_the_money_and_reply_of_chatless_reservations(
    empty_url: str, engine: AsyncEngine
) -> None:
    """0003 down to 0002 deletes the /v1 reservations in flight: each gives back its
    tokens, its money and its place among the user's concurrent replies. Only the tokens
    were: `active_replies` stayed counted with no reservation left to settle it, and a
    user on `concurrent_replies = 1` was refused every message (429) from then on."""
    await run_alembic(command.upgrade, empty_url, "0003_api_keys")
    async with engine.begin() as conn:
        await conn.execute(
            sa.text(
                "INSERT INTO user_usage (user_id, total_tokens_used, token_limit,"
                " reserved_tokens, updated_at, reserved_micros, active_replies) VALUES"
                " ('u', 0, 100, 30, CURRENT_TIMESTAMP, 500, 2)"
            )
        )
        for chat, tokens, micros in ((None, 20, 300), (uuid.uuid4(), 10, 200)):
            await conn.execute(
                sa.text(
                    "INSERT INTO reservations (reservation_id, user_id, chat_id, tokens,"
                    " micros, worker_id, stop_requested, expires_at, created_at) VALUES (:r,"
                    " 'u', :c, :t, :m, 'w', false, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
                ).bindparams(
                    sa.bindparam("r", type_=sa.Uuid()), sa.bindparam("c", type_=sa.Uuid())
                ),
                {"r": uuid.uuid4(), "c": chat, "t": tokens, "m": micros},
            )
    await run_alembic(command.downgrade, empty_url, "0002_plans")
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                sa.text("SELECT reserved_tokens, reserved_micros, active_replies FROM user_usage")
            )
        ).one()
        left = (await conn.execute(sa.text("SELECT tokens, micros FROM reservations"))).all()
    assert left == [(10, 200)]
    assert tuple(row) == (10, 200, 1)


async def test_existing_users_move_onto_the_default_plan_keeping_their_limits(
    empty_url: str, engine: AsyncEngine
) -> None:
    await run_alembic(command.upgrade, empty_url, "0001")
    async with engine.begin() as conn:
        await conn.execute(
            sa.text(
                "INSERT INTO user_usage (user_id, total_tokens_used, token_limit,"
                " reserved_tokens, updated_at) VALUES ('old', 40, 5000, 0, CURRENT_TIMESTAMP)"
            )
        )
    await run_alembic(command.upgrade, empty_url, "0004_messages_in_order")
    async with engine.connect() as conn:
        row = (await conn.execute(sa.text("SELECT * FROM user_usage"))).mappings().one()
    assert row["plan"] == "default"
    assert bool(row["token_limit_overridden"]) is True
    assert (row["token_limit"], row["total_tokens_used"]) == (5000, 40)
    assert (row["spend_micros"], row["reserved_micros"], row["active_replies"]) == (0, 0, 0)
    await run_alembic(command.downgrade, empty_url, "0001")
    async with engine.connect() as conn:
        kept = (await conn.execute(sa.text("SELECT user_id, token_limit FROM user_usage"))).all()
    assert kept == [("old", 5000)]


async def test_users_on_the_configured_default_plan_follow_the_default_from_then_on(
    empty_url: str, engine: AsyncEngine
) -> None:
    """Migration 0005: the users whose plan is the default configured when it runs
    (`chatmeter db upgrade` passes CHATMETER_DEFAULT_PLAN) lose their plan's name, so a
    later default moves them; the others keep theirs. Downgraded, each has a name again."""
    await run_alembic(command.upgrade, empty_url, "0004_messages_in_order")
    async with engine.begin() as conn:
        for user, plan in (("on-default", "starter"), ("assigned", "pro")):
            await conn.execute(
                sa.text(
                    "INSERT INTO user_usage (user_id, total_tokens_used, token_limit,"
                    " reserved_tokens, updated_at, plan) VALUES (:user, 0, 10, 0,"
                    " CURRENT_TIMESTAMP, :plan)"
                ),
                {"user": user, "plan": plan},
            )
    await asyncio.to_thread(upgrade, empty_url, "head", "starter")
    read = sa.text("SELECT user_id, plan FROM user_usage ORDER BY user_id")
    async with engine.connect() as conn:
        assert (await conn.execute(read)).all() == [("assigned", "pro"), ("on-default", "")]
    downgrading = alembic_config(empty_url, "starter")
    await asyncio.to_thread(command.downgrade, downgrading, "0004_messages_in_order")
    async with engine.connect() as conn:
        assert (await conn.execute(read)).all() == [("assigned", "pro"), ("on-default", "starter")]


async def test_the_history_index_is_built_without_blocking_writes_on_postgres(
    postgres: PostgresServer,
) -> None:
    """Migration 0004 builds the messages index CONCURRENTLY on PostgreSQL, outside a
    transaction (a plain CREATE INDEX holds every write to a large messages table until
    it ends): the statements Alembic sends, seen by SQLAlchemy as they go out."""
    name = f"e_{uuid.uuid4().hex[:12]}"
    postgres.createdb(name)
    url = postgres.url(name)
    await run_alembic(command.upgrade, url, "0003_api_keys")
    sent: list[str] = []

    def seen(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        sent.append(" ".join(statement.split()))

    sa.event.listen(sa.engine.Engine, "before_cursor_execute", seen)
    try:
        await run_alembic(command.upgrade, url, "head")
    finally:
        sa.event.remove(sa.engine.Engine, "before_cursor_execute", seen)
    built = [s for s in sent if "ix_messages" in s]
    assert built == [
        "CREATE INDEX CONCURRENTLY ix_messages_in_order ON messages "
        "(chat_id, created_at, role DESC, message_id DESC)",
        "DROP INDEX CONCURRENTLY ix_messages_chat_id_created_at",
    ]
