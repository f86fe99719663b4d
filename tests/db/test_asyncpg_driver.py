"""The PostgreSQL driver of the steps (`steps.run_asyncpg`): statements marked `alone` run
outside a transaction until one is not; what follows is one transaction, rolled back if
the steps raise; a unique violation of an `alone` statement is thrown into the steps as
`Conflict`, having written nothing, and the outbox counts it as refused for good."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from chatmeter.db.steps import Conflict, Sql, Steps
from chatmeter.db.transactor import PostgresTransactor, refused_for_good
from tests.support.postgres import PostgresServer


class Refused(Exception):
    pass


@pytest.fixture
async def dsn(postgres: PostgresServer) -> str:
    name = f"d_{uuid.uuid4().hex[:12]}"
    postgres.createdb(name)
    dsn = postgres.url(name).replace("postgresql+asyncpg://", "postgresql://", 1)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("CREATE TABLE items (name TEXT PRIMARY KEY)")
    finally:
        await conn.close()
    return dsn


@pytest.fixture
async def transactor(dsn: str) -> AsyncIterator[PostgresTransactor]:
    running = PostgresTransactor(dsn, pool_size=2)
    try:
        yield running
    finally:
        await running.close()


def insert(name: str, *, alone: bool) -> Sql:
    return Sql("INSERT INTO items (name) VALUES (:name)", {"name": name}, alone=alone)


def alone_then_together(first: str, second: str) -> Steps[None]:
    yield insert(first, alone=True)  # commits on its own
    yield insert(second, alone=False)  # begins the transaction the rest runs in
    raise Refused


def insert_or_say_taken(name: str) -> Steps[str]:
    try:
        yield insert(name, alone=True)
    except Conflict:
        rows = yield Sql("SELECT count(*) FROM items WHERE name = :name", {"name": name})
        return f"taken ({rows[0][0]} row)"
    return "inserted"


async def names(dsn: str) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        return [row[0] for row in await conn.fetch("SELECT name FROM items ORDER BY name")]
    finally:
        await conn.close()


async def test_alone_statements_commit_on_their_own_and_the_rest_is_one_transaction(
    transactor: PostgresTransactor, dsn: str
) -> None:
    with pytest.raises(Refused):
        await transactor.run(alone_then_together, "a", "b")
    assert await names(dsn) == ["a"]  # "b" rolled back with the transaction it began


async def test_a_unique_violation_alone_is_thrown_into_the_steps_as_conflict(
    transactor: PostgresTransactor, dsn: str
) -> None:
    assert await transactor.run(insert_or_say_taken, "x") == "inserted"
    # the second insert breaks the primary key: the steps hear it and go on, on the same
    # connection (nothing was begun, nothing is left aborted)
    assert await transactor.run(insert_or_say_taken, "x") == "taken (1 row)"
    assert await names(dsn) == ["x"]


async def test_a_conflict_nobody_caught_is_refused_for_good(
    transactor: PostgresTransactor,
) -> None:
    def insert_twice() -> Steps[None]:
        yield insert("y", alone=True)
        yield insert("y", alone=True)

    with pytest.raises(Conflict) as refused:
        await transactor.run(insert_twice)
    assert refused_for_good(refused.value)
