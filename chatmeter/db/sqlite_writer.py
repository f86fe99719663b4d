"""One thread that owns a sqlite3 connection and runs this process's write transactions.

SQLite lets one writer in at a time anyway; a thread of our own makes that one hop per
transaction instead of one per statement, and commits the transactions that queued up
meanwhile together (`commit_batch`: each in a SAVEPOINT, so one failing rolls back alone).
Other processes on the same file are kept in order by SQLite's own lock (BEGIN IMMEDIATE
with a busy timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from chatmeter.db.steps import Steps, run_sqlite

log = logging.getLogger("chatmeter.db")
T = TypeVar("T")
# at most this many transactions share one commit: bounds the latency of the first
MAX_BATCH = 64

Job = tuple[Callable[[], Steps[Any]], asyncio.Future[Any]]
Outcome = tuple[bool, Any]  # (True, result) or (False, exception)


def sqlite_path(url: str) -> str:
    """The file of a `sqlite+aiosqlite:///path` URL."""
    return url.split(":///", 1)[1].split("?", 1)[0] or ":memory:"


def connect_sqlite(path: str, busy_timeout_ms: int) -> sqlite3.Connection:
    """A connection for write transactions, set up as the engine's are (WAL, foreign
    keys); BEGIN and COMMIT are said explicitly."""
    conn = sqlite3.connect(
        path, timeout=busy_timeout_ms / 1000, isolation_level=None, check_same_thread=False
    )
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
    return conn


class SqliteWriter:
    def __init__(self, path: str, busy_timeout_ms: int) -> None:
        self._path = path
        self._busy_timeout_ms = busy_timeout_ms
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name="sqlite-writer", daemon=True)
        self._thread.start()

    async def run(self, steps: Callable[[], Steps[T]]) -> T:
        """Run the transaction `steps()` builds; its result, or its exception."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self.submit((steps, future))
        return await future

    def submit(self, job: Job) -> None:
        """Queue a job whose future someone already awaits."""
        self._jobs.put(job)

    async def close(self) -> None:
        self._jobs.put(None)
        await asyncio.to_thread(self._thread.join)

    def _connect(self) -> sqlite3.Connection:
        return connect_sqlite(self._path, self._busy_timeout_ms)

    def _work(self) -> None:
        conn: sqlite3.Connection | None = None
        while True:
            job = self._jobs.get()
            if job is None:
                break
            batch = [job]
            while len(batch) < MAX_BATCH:
                try:
                    more = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._jobs.put(None)  # finish this batch, then stop
                    break
                batch.append(more)
            try:
                conn = conn or self._connect()
                conn.execute("BEGIN IMMEDIATE")
                outcomes = commit_batch(conn, batch)
            except Exception as exc:  # the database itself failed: every job fails
                outcomes = [(False, exc)] * len(batch)
                if conn is not None:
                    conn.close()
                conn = None  # reconnect on the next batch
            _deliver(batch, outcomes)
        if conn is not None:
            conn.close()


def commit_batch(conn: sqlite3.Connection, batch: list[Job]) -> list[Outcome]:
    """Run each job of `batch` in the transaction the caller began, then COMMIT once.
    A job that raises is rolled back alone (its own SAVEPOINT) and gets its exception;
    the others commit. Raises, having rolled back, if the database itself fails."""
    outcomes: list[Outcome] = []
    try:
        if len(batch) == 1:  # nothing to keep apart: no savepoint
            try:
                outcomes.append((True, run_sqlite(conn, batch[0][0]())))
            except Exception as exc:
                conn.execute("ROLLBACK")
                return [(False, exc)]
        else:
            for steps, _ in batch:
                conn.execute("SAVEPOINT job")
                try:
                    outcomes.append((True, run_sqlite(conn, steps())))
                    conn.execute("RELEASE job")
                except Exception as exc:
                    conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
                    outcomes.append((False, exc))
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return outcomes


def resolve(batch: list[Job], outcomes: list[Outcome]) -> None:
    """Hand each job its outcome; runs on the loop the futures belong to."""
    for (_, future), (ok, value) in zip(batch, outcomes, strict=True):
        if future.done():
            continue  # its caller was cancelled
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)


def _deliver(batch: list[Job], outcomes: list[Outcome]) -> None:
    """Hand each job its outcome on the loop that waits for it (one wake-up per loop)."""
    by_loop: dict[asyncio.AbstractEventLoop, tuple[list[Job], list[Outcome]]] = {}
    for job, outcome in zip(batch, outcomes, strict=True):
        jobs, their_outcomes = by_loop.setdefault(job[1].get_loop(), ([], []))
        jobs.append(job)
        their_outcomes.append(outcome)
    for loop, (jobs, their_outcomes) in by_loop.items():
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting
            loop.call_soon_threadsafe(resolve, jobs, their_outcomes)
