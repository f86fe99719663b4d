"""The SQLite transactor: transactions run in the writer process, those asked for
together share one commit (group commit), each is still all-or-nothing, another
process's write lock delays them without blocking the loop, and a writer process that
dies fails what it had not answered and is started again. On a quiet server a lone
transaction commits on the loop, and the idle writer process checkpoints the WAL."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import signal
import sqlite3
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from chatmeter.config import load_settings
from chatmeter.db.migrate import upgrade
from chatmeter.db.sqlite_process import MAX_BATCH, encode_jobs
from chatmeter.db.steps import Sql, Steps
from chatmeter.db.transactor import SqliteTransactor, WriterGone, make_transactor
from chatmeter.metering.settlement import settle_steps
from chatmeter.services import start_services
from chatmeter.streaming.opening import open_steps
from tests.conftest import make_settings
from tests.support.waiting import eventually


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
def commits(db_path: Path) -> Callable[[], int]:
    """How many COMMITs the writer process of `running(db_path)` has run (it writes its
    statements to a file)."""
    trace = trace_file(db_path)
    return lambda: trace.read_text().splitlines().count("COMMIT") if trace.exists() else 0


def trace_file(db_path: Path) -> Path:
    return db_path.parent / "writer.sql"


@contextlib.asynccontextmanager
async def running(db_path: Path, *, inline: bool = True) -> AsyncIterator[SqliteTransactor]:
    """A transactor on `db_path` with its writer process up, closed afterwards;
    `inline=False` sends every transaction to the writer. The writer imports this module
    as it starts, as the server's imports its transactions' modules: else it imports it
    to read the first job (pytest and the whole app, 2-10 s on a busy machine), inside
    the bounds some tests set on how long a transaction may take."""
    transactor = SqliteTransactor(
        f"sqlite+aiosqlite:///{db_path}",
        busy_timeout_ms=5000,
        inline=inline,
        trace_file=str(trace_file(db_path)),
        preload=(__name__,),
    )
    try:
        await transactor.start()
        yield transactor
    finally:
        await transactor.close()


def insert(name: str, *, then_fail: bool = False) -> Steps[str]:
    rows = yield Sql("INSERT INTO items (name) VALUES (:name) RETURNING name", {"name": name})
    if then_fail:
        raise Refused(name)
    return str(rows[0][0])


def slow_insert(name: str, seconds: float) -> Steps[str]:
    time.sleep(seconds)  # in the writer process, inside the transaction
    return (yield from insert(name))


def write_locked(path: Path) -> bool:
    """Another connection holds the database's write lock."""
    conn = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ROLLBACK")
        return False
    except sqlite3.OperationalError:
        return True
    finally:
        conn.close()


def names(path: Path) -> set[str]:
    with sqlite3.connect(path) as conn:
        return {row[0] for row in conn.execute("SELECT name FROM items")}


async def test_concurrent_transactions_share_one_commit(
    db_path: Path, commits: Callable[[], int]
) -> None:
    async with running(db_path, inline=False) as transactor:
        wanted = [f"item{i}" for i in range(MAX_BATCH)]
        got = await asyncio.gather(*(transactor.run(insert, n) for n in wanted))
        assert got == wanted
        assert commits() == 1
        assert names(db_path) == set(wanted)
        # none refused: they ran one after another, with no savepoint between them
        assert "SAVEPOINT job" not in trace_file(db_path).read_text()
        # one alone commits alone, as soon as it is asked for
        assert await transactor.run(insert, "alone") == "alone"
        assert commits() == 2
        # a burst is answered a commit of MAX_BATCH at a time
        burst = [f"burst{i}" for i in range(2 * MAX_BATCH + 1)]
        assert await asyncio.gather(*(transactor.run(insert, n) for n in burst)) == burst
        assert commits() == 5


async def test_a_failing_transaction_rolls_back_alone(
    db_path: Path, commits: Callable[[], int]
) -> None:
    async with running(db_path, inline=False) as transactor:
        results = await asyncio.gather(
            transactor.run(insert, "a"),
            transactor.run(insert, "b", then_fail=True),
            transactor.run(insert, "a"),  # the primary key refuses it
            transactor.run(insert, "c"),
            return_exceptions=True,
        )
        assert results[0] == "a" and results[3] == "c"
        assert isinstance(results[1], Refused)
        assert isinstance(results[2], sqlite3.IntegrityError)
        assert names(db_path) == {"a", "c"}
        assert commits() == 1
        # run together first, then again each in a savepoint once one was refused
        statements = trace_file(db_path).read_text().splitlines()
        assert statements.count("ROLLBACK") == 1
        assert statements.count("SAVEPOINT job") == 4
        # a lone failing transaction leaves nothing either, and the next one works
        with pytest.raises(Refused):
            await transactor.run(insert, "d", then_fail=True)
        assert await transactor.run(insert, "e") == "e"
        assert names(db_path) == {"a", "c", "e"}


async def test_a_caller_cancelled_before_its_turn_ended_writes_nothing(db_path: Path) -> None:
    async with running(db_path, inline=False) as transactor:
        cancelled = asyncio.ensure_future(transactor.run(insert, "gone"))
        kept = asyncio.ensure_future(transactor.run(insert, "kept"))
        await asyncio.sleep(0)  # both have asked; they are sent at the end of the turn
        cancelled.cancel()
        assert await kept == "kept"
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert names(db_path) == {"kept"}


async def test_another_process_holding_the_lock_delays_but_does_not_fail(db_path: Path) -> None:
    other = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
    try:
        async with running(db_path) as transactor:
            other.execute("BEGIN IMMEDIATE")
            waiting = asyncio.gather(*(transactor.run(insert, n) for n in "xyz"))
            await asyncio.sleep(0.3)
            assert not waiting.done()  # the writer process waits for the lock; the loop runs
            other.execute("COMMIT")
            assert await asyncio.wait_for(waiting, 5) == ["x", "y", "z"]
            assert names(db_path) == {"x", "y", "z"}
    finally:
        other.close()


async def test_the_loop_runs_while_the_writer_works(db_path: Path) -> None:
    async with running(db_path, inline=False) as transactor:
        slow = asyncio.ensure_future(transactor.run(slow_insert, "slow", 0.5))
        ticks = 0
        while not slow.done():
            await asyncio.sleep(0.01)
            ticks += 1
        assert await slow == "slow"
        assert ticks >= 10  # a transaction on the loop would have held it for 0.5 s


async def test_a_writer_that_dies_fails_what_it_held_and_is_started_again(db_path: Path) -> None:
    async with running(db_path, inline=False) as transactor:
        pid = transactor.pid
        assert pid is not None
        held = asyncio.ensure_future(transactor.run(slow_insert, "held", 5.0))
        await eventually(lambda: write_locked(db_path))  # the writer is inside it
        os.kill(pid, signal.SIGKILL)
        # a ConnectionError: the API answers 503 DATABASE_ERROR, settlement retries
        with pytest.raises(WriterGone):
            await asyncio.wait_for(held, 5)
        assert await transactor.run(insert, "after") == "after"
        assert transactor.pid not in (None, pid)
        assert names(db_path) == {"after"}  # the killed transaction never committed


class Unpicklable(str):
    """A name that cannot cross to the writer process."""

    def __reduce__(self) -> tuple[Any, ...]:
        raise TypeError("this name does not pickle")


async def test_arguments_that_cannot_be_sent_fail_that_caller_alone(db_path: Path) -> None:
    async with running(db_path, inline=False) as transactor:
        results = await asyncio.gather(
            transactor.run(insert, Unpicklable("not picklable")),
            transactor.run(insert, "fine"),
            return_exceptions=True,
        )
        assert isinstance(results[0], (AttributeError, TypeError, pickle.PicklingError))
        assert results[1] == "fine"
        assert names(db_path) == {"fine"}


class Naming:
    """Configuration a transaction takes, counting how often it is pickled."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.pickled = 0

    def __reduce__(self) -> tuple[Any, ...]:
        self.pickled += 1
        return (Naming, (self.prefix,))


def insert_named(naming: Naming, name: str) -> Steps[str]:
    return (yield from insert(naming.prefix + name))


async def test_constants_cross_once_per_writer_process(db_path: Path) -> None:
    naming = Naming("n-")
    transactor = SqliteTransactor(
        f"sqlite+aiosqlite:///{db_path}", busy_timeout_ms=5000, inline=False, constants=(naming,)
    )
    try:
        await transactor.start()
        assert [await transactor.run(insert_named, naming, str(i)) for i in range(3)] == [
            "n-0",
            "n-1",
            "n-2",
        ]
        assert naming.pickled == 1  # once, not with each frame
        # the same value in another object is an argument like any other
        assert await transactor.run(insert_named, Naming("other-"), "x") == "other-x"

        pid = transactor.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        await eventually(lambda: transactor.pid is None)
        # the process started again is sent the same frame of constants (it names them)
        assert await transactor.run(insert_named, naming, "3") == "n-3"
        assert naming.pickled == 1
    finally:
        await transactor.close()
    assert names(db_path) == {"n-0", "n-1", "n-2", "other-x", "n-3"}


def refuse_to_load() -> None:
    raise RuntimeError("this constant cannot be read in the writer process")


class Unreadable:
    """Pickles in the server; reading it in the writer process fails."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (refuse_to_load, ())


async def test_constants_the_writer_cannot_read_fail_its_start(db_path: Path) -> None:
    transactor = SqliteTransactor(
        f"sqlite+aiosqlite:///{db_path}", busy_timeout_ms=5000, constants=(Unreadable(),)
    )
    try:
        # a start that failed (503, backed off), not a writer that fails every job
        with pytest.raises(WriterGone, match="could not start"):
            await transactor.start()
        assert transactor.pid is None
    finally:
        await transactor.close()


def test_constants_that_do_not_pickle_are_refused_when_given() -> None:
    with pytest.raises(TypeError):
        SqliteTransactor("sqlite+aiosqlite:///unused.db", 5000, constants=(threading.Lock(),))
    with pytest.raises(TypeError, match="cannot be a constant"):  # never named by number
        SqliteTransactor("sqlite+aiosqlite:///unused.db", 5000, constants=({"a": 1},))


async def test_the_server_names_its_rules_and_plans_by_number(tmp_path: Path) -> None:
    """What every opening and every settlement takes is among the server's constants."""
    url = f"sqlite+aiosqlite:///{tmp_path / 's.db'}"
    upgrade(url)
    services = await start_services(make_settings(url))
    try:
        assert isinstance(services.transactor, SqliteTransactor)
        frame = encode_jobs(
            [1, 2],
            [
                (open_steps, (services.opening_rules, "u", uuid.uuid4(), "hi"), {}),
                (settle_steps, (None, services.plans), {}),
            ],
            services.transactor.constants,
        )
        assert b"OpeningRules" not in frame and b"PlanBook" not in frame
    finally:
        await services.aclose()


async def test_a_lone_transaction_on_a_quiet_server_commits_on_the_loop(
    db_path: Path, commits: Callable[[], int]
) -> None:
    async with running(db_path) as transactor:
        assert await transactor.run(insert, "quiet") == "quiet"
        with pytest.raises(Refused):
            await transactor.run(insert, "refused", then_fail=True)
        assert names(db_path) == {"quiet"}
        assert commits() == 0  # the writer process was not asked


async def test_while_the_writer_is_busy_a_lone_transaction_goes_to_it(
    db_path: Path, commits: Callable[[], int]
) -> None:
    async with running(db_path) as transactor:
        # more than a quiet turn's worth goes to the writer (and waits for it to be up)
        await asyncio.gather(*(transactor.run(insert, n) for n in "xyz"))
        # again, and it holds them 0.3 s
        busy = asyncio.gather(*(transactor.run(slow_insert, n, 0.1) for n in "abc"))
        await asyncio.sleep(0.05)
        lone = asyncio.ensure_future(transactor.run(insert, "lone"))
        await asyncio.sleep(0.05)
        assert not lone.done()  # not committed here past the writer's back
        assert await busy == ["a", "b", "c"]
        assert await lone == "lone"
        assert commits() == 3


def wide_insert(name: str) -> Steps[str]:
    rows = yield Sql(
        "INSERT INTO items (name) VALUES (:name) RETURNING name", {"name": name + "x" * 3000}
    )
    return str(rows[0][0])[: len(name)]


async def test_the_idle_writer_checkpoints_what_the_loop_committed(db_path: Path) -> None:
    async with running(db_path) as transactor:
        size_before = file_size(db_path)
        for i in range(300):  # one at a time: all on the loop's connection
            await transactor.run(wide_insert, f"row{i:03}")
        assert file_size(db_path) == size_before  # the loop never checkpoints
        # copied into the database file by the writer process, idle meanwhile
        await eventually(lambda: file_size(db_path) >= size_before + 500_000, within=60)


def file_size(path: Path) -> int:
    return path.stat().st_size


async def test_the_wal_starts_over_while_the_loop_commits_without_a_pause(
    db_path: Path,
) -> None:
    # one client asking as fast as it can: every transaction commits on the loop's
    # connection, one after another, and the idle writer's checkpoint must still let the
    # WAL start over; otherwise it grows by every transaction's pages while the client asks
    # (a checkpoint that copies while the loop commits never catches up)
    async with running(db_path) as transactor:
        await transactor.run(wide_insert, "first")
        started = wal_starts(db_path)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        count = 0
        while wal_starts(db_path) == started:
            assert loop.time() < deadline, f"the WAL did not start over in {count} commits"
            await transactor.run(wide_insert, f"row{count:06}")
            count += 1


def wal_starts(db_path: Path) -> int:
    """How many times the WAL has started over: its header's checkpoint sequence number."""
    with open(f"{db_path}-wal", "rb") as wal:
        return int.from_bytes(wal.read(16)[12:16], "big")


class Awkward(Exception):
    """Pickles, but cannot be rebuilt from its args."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")


def insert_then_awkward(name: str) -> Steps[str]:
    yield from insert(name)
    raise Awkward("E1", "not rebuildable")


async def test_an_exception_that_cannot_cross_comes_back_named(db_path: Path) -> None:
    async with running(db_path, inline=False) as transactor:
        with pytest.raises(RuntimeError, match="Awkward: E1: not rebuildable"):
            await transactor.run(insert_then_awkward, "gone")
        pid = transactor.pid
        assert await transactor.run(insert, "next") == "next"  # the same writer goes on
        assert transactor.pid == pid
        assert names(db_path) == {"next"}
    with pytest.raises(WriterGone):  # closed: nothing starts a writer again
        await transactor.run(insert, "late")


async def test_the_trace_setting_reaches_the_writer_process(db_path: Path, tmp_path: Path) -> None:
    trace = tmp_path / "configured.sql"
    settings = load_settings(
        environ={
            "CHATMETER_DATABASE_URL": f"sqlite+aiosqlite:///{db_path}",
            "CHATMETER_SQLITE_TRACE_FILE": str(trace),
        }
    )
    transactor = make_transactor(
        settings.database_url,
        settings.sqlite_busy_timeout_ms,
        sqlite_trace_file=settings.sqlite_trace_file,
    )
    try:
        await transactor.start()
        # more than a quiet turn's worth: they go to the writer process
        await asyncio.gather(*(transactor.run(insert, n) for n in "xyz"))
    finally:
        await transactor.close()
    assert trace.read_text().splitlines().count("COMMIT") >= 1
