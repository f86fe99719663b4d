"""The SQLite transactor: transactions asked for together share one commit (group
commit), each is still all-or-nothing, and the write lock of another process sends
them to the writer thread instead of failing or blocking the loop."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from chatmeter.db import transactor as transactor_module
from chatmeter.db.sqlite_writer import connect_sqlite
from chatmeter.db.steps import Sql, Steps
from chatmeter.db.transactor import SqliteTransactor


class Refused(Exception):
    pass


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    path = tmp_path / "t.db"
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE items (name TEXT PRIMARY KEY)")
    return path


@pytest.fixture
def commits(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every COMMIT the transactor's own connection runs."""
    seen: list[str] = []

    def traced(path: str, busy_timeout_ms: int) -> sqlite3.Connection:
        conn = connect_sqlite(path, busy_timeout_ms)
        conn.set_trace_callback(lambda sql: seen.append(sql) if sql == "COMMIT" else None)
        return conn

    monkeypatch.setattr(transactor_module, "connect_sqlite", traced)
    yield seen


def insert(name: str, *, then_fail: bool = False) -> Steps[str]:
    rows = yield Sql("INSERT INTO items (name) VALUES (:name) RETURNING name", {"name": name})
    if then_fail:
        raise Refused(name)
    return str(rows[0][0])


def names(path: Path) -> set[str]:
    with sqlite3.connect(path) as conn:
        return {row[0] for row in conn.execute("SELECT name FROM items")}


async def test_concurrent_transactions_share_one_commit(db_path: Path, commits: list[str]) -> None:
    transactor = SqliteTransactor(f"sqlite+aiosqlite:///{db_path}", busy_timeout_ms=5000)
    try:
        wanted = [f"item{i}" for i in range(20)]
        got = await asyncio.gather(*(transactor.run(partial(insert, n)) for n in wanted))
        assert got == wanted
        assert len(commits) == 1
        assert names(db_path) == set(wanted)
        # one alone commits alone, as soon as it is asked for
        assert await transactor.run(lambda: insert("alone")) == "alone"
        assert len(commits) == 2
    finally:
        await transactor.close()


async def test_a_failing_transaction_rolls_back_alone(db_path: Path, commits: list[str]) -> None:
    transactor = SqliteTransactor(f"sqlite+aiosqlite:///{db_path}", busy_timeout_ms=5000)
    try:
        results = await asyncio.gather(
            transactor.run(lambda: insert("a")),
            transactor.run(lambda: insert("b", then_fail=True)),
            transactor.run(lambda: insert("a")),  # the primary key refuses it
            transactor.run(lambda: insert("c")),
            return_exceptions=True,
        )
        assert results[0] == "a" and results[3] == "c"
        assert isinstance(results[1], Refused)
        assert isinstance(results[2], sqlite3.IntegrityError)
        assert names(db_path) == {"a", "c"}
        assert len(commits) == 1
        # a lone failing transaction leaves nothing either, and the next one works
        with pytest.raises(Refused):
            await transactor.run(lambda: insert("d", then_fail=True))
        assert await transactor.run(lambda: insert("e")) == "e"
        assert names(db_path) == {"a", "c", "e"}
    finally:
        await transactor.close()


async def test_a_caller_cancelled_before_the_commit_writes_nothing(db_path: Path) -> None:
    transactor = SqliteTransactor(f"sqlite+aiosqlite:///{db_path}", busy_timeout_ms=5000)
    try:
        cancelled = asyncio.ensure_future(transactor.run(lambda: insert("gone")))
        kept = asyncio.ensure_future(transactor.run(lambda: insert("kept")))
        await asyncio.sleep(0)  # both have asked; the commit is the next turn
        cancelled.cancel()
        assert await kept == "kept"
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert names(db_path) == {"kept"}
    finally:
        await transactor.close()


async def test_another_process_holding_the_lock_delays_but_does_not_fail(db_path: Path) -> None:
    transactor = SqliteTransactor(f"sqlite+aiosqlite:///{db_path}", busy_timeout_ms=5000)
    other = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
    try:
        other.execute("BEGIN IMMEDIATE")
        waiting = asyncio.gather(*(transactor.run(partial(insert, n)) for n in "xyz"))
        await asyncio.sleep(0.3)
        assert not waiting.done()  # queued on the writer thread; the loop kept running
        other.execute("COMMIT")
        assert await asyncio.wait_for(waiting, 5) == ["x", "y", "z"]
        assert names(db_path) == {"x", "y", "z"}
    finally:
        other.close()
        await transactor.close()
