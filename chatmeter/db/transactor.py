"""Runs the message path's transactions (`steps.py`) on the configured database.

A transaction is named by a module-level steps function and its arguments,
`run(settle_steps, settlement)`, not by a closure: on SQLite it runs in another process
(`sqlite_process.py`), which receives the function by name and the arguments pickled
(the server's constants, its opening rules and plans, by number)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import pickle
import random
import sqlite3
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from operator import attrgetter
from typing import Any, ParamSpec, Protocol, TypeVar

import asyncpg

from chatmeter.db.pg_connections import Connections
from chatmeter.db.sqlite_process import (
    ANSWER_HEADER,
    Constants,
    Outcome,
    commit_batch,
    connect_sqlite,
    encode_jobs,
    sqlite_path,
)
from chatmeter.db.steps import Conflict, PostgresStatements, Rows, Sql, Steps, run_asyncpg

log = logging.getLogger("chatmeter.db")
T = TypeVar("T")
P = ParamSpec("P")

# at most this many transactions of one turn run on the loop when the writer is idle
INLINE_MOST = 2
# PostgreSQL chose this transaction to lose a race (deadlock, serialization failure):
# it rolled it back, and running it again is the remedy
RACE_LOST = frozenset({"40P01", "40001"})
RACE_ATTEMPTS = 5
RACE_BACKOFF_SECONDS = 0.01  # the first retry waits up to this, then 2x, 4x... (jittered)
# a writer process that ended before it was ready is started again after this, then 2x,
# 4x... up to START_BACKOFF_MOST: not once per request
START_BACKOFF_SECONDS = 0.5
START_BACKOFF_MOST = 30.0
START_TIMEOUT_SECONDS = 60.0  # from its start to its first frame (imports, on a busy host)


def refused_for_good(exc: BaseException) -> bool:
    """Whether the database refused a transaction for what it says (a constraint it
    breaks, a value it cannot hold), so running it again can only fail again; anything
    else (the database is down, busy, restarting) may pass later."""
    if isinstance(exc, Conflict):  # a unique violation outside a transaction
        return True
    if isinstance(exc, asyncpg.PostgresError):
        return str(exc.sqlstate)[:2] in ("22", "23")  # data exception, integrity violation
    # asyncpg's own DataError (a value it cannot send) is a ValueError; sqlite3 raises
    # OverflowError for an integer no SQLite INTEGER holds
    return isinstance(
        exc, (sqlite3.IntegrityError, sqlite3.DataError, ValueError, TypeError, OverflowError)
    )


class Transactor(Protocol):
    # whether the database runs data-modifying CTEs (PostgreSQL): a transaction's writes
    # can then be one statement, one round trip
    writable_ctes: bool

    async def run(self, steps: Callable[P, Steps[T]], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run the transaction `steps(*args, **kwargs)` and commit it; roll back and
        raise if it raises. A retry calls `run` again and starts afresh."""
        ...

    async def run_together(
        self, order: str, steps: Callable[P, Steps[T]], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """`run`, for a transaction whose first statement is marked `alone` (a
        settlement, an opening): PostgreSQL sends those asked for in the same turn of the
        loop together, in the order of `order` (the lock order: the user's row first).
        Only a statement whose rows can be told apart (`Sql.keyed_by`) goes with
        others; a transaction that goes on after it must have written nothing with it
        (it is then run again, alone). The outcome is each one's as if it had run alone."""
        ...

    async def caught_up(self) -> None:
        """Return once every transaction asked for before the call has ended, committed
        or not, whether or not its caller still waits for it: what takes back the work
        of a caller cancelled while its transaction was out waits here first, so that it
        does not run before that transaction and find nothing to take back."""
        ...

    async def start(self) -> None:
        """Get ready at start-up (a database that is down is not an error here)."""
        ...

    async def close(self) -> None: ...


_Job = tuple[int, tuple[Any, ...], asyncio.Future[Any]]  # id, (steps, args, kwargs), caller


def _pickles(job: _Job, constants: Constants) -> bool:
    """Whether the call of `job` can be sent; if not, its caller hears why."""
    _, call, future = job
    try:
        constants.encoder.dumps(call)
    except Exception as exc:
        future.set_exception(exc)
        return False
    return True


def _answer(future: asyncio.Future[Any], ok: bool, value: Any) -> None:
    """Hand a caller its transaction's result or exception, unless it was cancelled."""
    if future.done():
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)


async def _ready(process: asyncio.subprocess.Process) -> None:
    """Wait for the writer process's first frame, which says it is ready (it has none
    of our jobs yet, so the frame answers none)."""
    assert process.stdout is not None
    (length,) = ANSWER_HEADER.unpack(await process.stdout.readexactly(ANSWER_HEADER.size))
    await process.stdout.readexactly(length)


class OutcomeUnknown(ConnectionError):
    """The database was lost before it answered: the transaction may or may not have
    committed (callers that retry, like settlement, check first; an opening takes
    itself back)."""


class WriterGone(OutcomeUnknown):
    """The SQLite writer process ended before it answered."""


class ConnectionLost(OutcomeUnknown):
    """PostgreSQL's connection was lost while a transaction ran on it: a statement run
    alone (`steps.Sql.alone`) commits as it ends, so it may have, unseen."""


_Pending = tuple[Callable[..., Steps[Any]], tuple[Any, ...], dict[str, Any], asyncio.Future[Any]]


class SqliteTransactor:
    """Hands transactions to the writer process (`sqlite_process.py`) and waits for its
    answer; the loop goes on serving streams meanwhile.

    Transactions asked for in the same turn of the loop go out in one write, and the
    process commits the ones that arrived together with one COMMIT (group commit): under
    load most of the commits leave the message path, and a caller still hears back only
    once its writes are committed. A caller cancelled before its turn ended sends
    nothing. The process is started on first use and again if it dies.

    When the process has nothing in hand and a turn asks for one or two transactions
    (a quiet server), they run right here instead: a hop to an idle process and back
    costs about a millisecond of waking up each way, far more than the transaction.
    This connection never checkpoints the WAL (the writer process does, also when it is
    idle), so no stall lands on the loop. `inline=False` sends everything."""

    writable_ctes = False

    def __init__(
        self,
        url: str,
        busy_timeout_ms: int,
        *,
        inline: bool = True,
        start_backoff_seconds: float = START_BACKOFF_SECONDS,
        trace_file: str | None = None,
        preload: Sequence[str] = (),
        constants: Sequence[object] = (),
    ) -> None:
        self._path = sqlite_path(url)
        self.constants = Constants(tuple(constants))
        self._busy_timeout_ms = busy_timeout_ms
        self._trace_file = trace_file
        self._preload = tuple(preload)
        self._process: asyncio.subprocess.Process | None = None
        self._answers: asyncio.Task[None] | None = None
        self._starting = asyncio.Lock()
        self._pending: list[_Pending] = []
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._job_ids = itertools.count()
        self._inline = inline
        self._here: sqlite3.Connection | None = None
        self._closed = False
        self._start_backoff = start_backoff_seconds
        self._failed_starts = 0  # in a row
        self._next_start = 0.0  # loop time

    async def run(self, steps: Callable[P, Steps[T]], *args: P.args, **kwargs: P.kwargs) -> T:
        if self._closed:
            raise WriterGone("the transactor is closed")
        if self._process is None:
            await self.start()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._send)  # after the other tasks of this turn asked too
        self._pending.append((steps, args, kwargs, future))
        return await future

    async def run_together(
        self, order: str, steps: Callable[P, Steps[T]], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """`run`: the writer process already commits the transactions of a turn together."""
        return await self.run(steps, *args, **kwargs)

    @property
    def pid(self) -> int | None:
        """The writer process, None while there is none."""
        return self._process.pid if self._process is not None else None

    async def caught_up(self) -> None:
        # the writer process takes transactions in the order they are asked for, and one
        # whose caller was cancelled before it went out is never sent
        return None

    async def start(self) -> None:
        """Start the writer process (`run` does too, when there is none)."""
        async with self._starting:
            if self._process is not None:
                return
            wait = self._next_start - asyncio.get_running_loop().time()
            if wait > 0:
                raise WriterGone(
                    f"the SQLite writer process could not start; next try in {wait:.1f} s"
                )
            try:
                process = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "chatmeter.db.sqlite_process",
                    self._path,
                    str(self._busy_timeout_ms),
                    self._trace_file or "",
                    *self._preload,
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                )
            except OSError as exc:
                self._start_failed(str(exc))
                raise WriterGone(f"could not start the SQLite writer process: {exc}") from exc
            try:
                assert process.stdin is not None
                process.stdin.write(self.constants.frame)  # read before it says it is ready
                await asyncio.wait_for(_ready(process), START_TIMEOUT_SECONDS)
            except BaseException as exc:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
                if not isinstance(exc, Exception):
                    raise  # cancelled
                self._start_failed(f"{type(exc).__name__}, exit code {process.returncode}")
                raise WriterGone("the SQLite writer process could not start") from exc
            self._failed_starts = 0
            self._process = process
            self._waiting = {}  # this process's; a reader of an older one keeps its own
            self._answers = asyncio.get_running_loop().create_task(
                self._read_answers(process, self._waiting)
            )

    def _start_failed(self, why: str) -> None:
        self._failed_starts += 1
        delay = min(self._start_backoff * 2 ** (self._failed_starts - 1), START_BACKOFF_MOST)
        self._next_start = asyncio.get_running_loop().time() + delay
        log.error("the SQLite writer process could not start (%s); next try in %.1f s", why, delay)

    def _send(self) -> None:
        pending, self._pending = self._pending, []
        try:
            self._send_now(pending)
        except Exception as exc:  # a bug: no caller is left waiting for nothing
            for *_, future in pending:
                if not future.done():
                    future.set_exception(exc)
            raise

    def _send_now(self, pending: list[_Pending]) -> None:
        jobs: list[_Job] = [
            (next(self._job_ids), (steps, args, kwargs), future)
            for steps, args, kwargs, future in pending
            if not future.done()  # cancelled since: nothing is sent, nothing written
        ]
        process = self._process
        if process is None or process.stdin is None:  # it died since they asked
            for *_, future in jobs:
                future.set_exception(WriterGone("the SQLite writer process is not running"))
            return
        if not jobs:
            return
        if self._inline and not self._waiting and len(jobs) <= INLINE_MOST:
            outcomes = self._commit_here(jobs)
            if outcomes is not None:
                for (_, _, future), (ok, value) in zip(jobs, outcomes, strict=True):
                    _answer(future, ok, value)
                return
        try:
            frame = encode_jobs([job[0] for job in jobs], [job[1] for job in jobs], self.constants)
        except Exception:  # a bug: the calls that do not pickle fail, the others go
            jobs = [job for job in jobs if _pickles(job, self.constants)]
            if not jobs:
                return
            frame = encode_jobs([job[0] for job in jobs], [job[1] for job in jobs], self.constants)
        for job_id, _, future in jobs:
            self._waiting[job_id] = future
        # if it died, `_read_answers` fails whatever is waiting
        with contextlib.suppress(ConnectionError, RuntimeError):
            process.stdin.write(frame)

    def _commit_here(self, jobs: list[_Job]) -> list[Outcome] | None:
        """Commit `jobs` on this thread's connection; None, having done nothing, if the
        write lock is taken or the database fails (the writer process then takes them,
        waiting for the lock or reporting the failure)."""
        try:
            if self._here is None:
                self._here = connect_sqlite(self._path, busy_timeout_ms=0)
                self._here.execute("PRAGMA wal_autocheckpoint=0")
            self._here.execute("BEGIN IMMEDIATE")
            return commit_batch(self._here, [partial(f, *a, **k) for _, (f, a, k), _ in jobs])
        except sqlite3.Error as exc:
            busy = getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_BUSY
            if self._here is not None and not busy:  # a lock taken leaves it usable
                self._here.close()
                self._here = None
            return None

    async def _read_answers(
        self, process: asyncio.subprocess.Process, waiting: dict[int, asyncio.Future[Any]]
    ) -> None:
        assert process.stdout is not None
        try:
            while True:
                (length,) = ANSWER_HEADER.unpack(
                    await process.stdout.readexactly(ANSWER_HEADER.size)
                )
                answers = pickle.loads(await process.stdout.readexactly(length))
                for job_id, ok, value in answers:
                    future = waiting.pop(job_id, None)
                    if future is not None:
                        _answer(future, ok, value)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the process ended
        except Exception:  # an answer that cannot be read: this process is not trusted
            log.exception("the SQLite writer process sent an unreadable answer")
            with contextlib.suppress(ProcessLookupError):
                process.kill()
        finally:
            if self._process is process:
                self._process = None  # the next transaction starts another
            for future in waiting.values():
                if not future.done():
                    future.set_exception(WriterGone("the SQLite writer process ended"))
            waiting.clear()

    async def close(self) -> None:
        self._closed = True
        if self._here is not None:
            self._here.close()
            self._here = None
        process, self._process = self._process, None
        if process is None:
            return
        if process.stdin is not None:
            process.stdin.close()  # the process finishes what it has, then ends
        try:
            await asyncio.wait_for(process.wait(), timeout=30)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
        if self._answers is not None:
            await self._answers


def _name(steps: Callable[..., Any]) -> str:
    return getattr(steps, "__name__", "a transaction")


# a transaction's steps and their first statement, taken and not yet sent
_Begun = tuple[Steps[T], Sql]


@dataclass(eq=False, slots=True)
class _Together:
    """A transaction waiting in `PostgresTransactor.run_together`."""

    order: str
    steps: Callable[[], Steps[Any]]  # its steps, begun only if it is sent with others
    # the transaction run on its own (`PostgresTransactor._run`), from where it was begun
    alone: Callable[[_Begun[Any] | None], Awaitable[Any]]
    done: asyncio.Future[Any]
    transaction: Steps[Any] | None = None  # begun
    first: Sql | None = None  # its first statement, while it is not sent
    key: object = None  # the value its rows begin with (`Sql.keyed_by`)

    def begin(self, statements: PostgresStatements) -> tuple[str, list[object]] | None:
        """Its first statement as asyncpg takes it; None if that statement cannot go with
        others: not `alone`, or its rows cannot be told apart (not `keyed_by`)."""
        self.transaction = self.steps()
        self.first = next(self.transaction)
        if not (self.first.alone and self.first.keyed_by):
            return None
        self.key = self.first.params[self.first.keyed_by]
        return statements.convert(self.first)

    def finish(self, rows: Rows) -> bool:
        """Hand the transaction its statement's rows. True if it ended there; False if
        it goes on (it wrote nothing, `run_together`'s terms): it is then to run alone,
        from its start."""
        assert self.transaction is not None
        self.first = None
        try:
            self.transaction.send(rows)
        except StopIteration as end:
            self.succeed(end.value)
        except Exception as exc:
            self.fail(exc)
        else:
            self.transaction.close()
            self.transaction = None
            return False
        return True

    async def run_alone(self) -> None:
        """Run it on its own: from its first statement if that was taken and not sent
        (its steps are not made twice), else from its start."""
        if self.done.done():  # its caller was cancelled: nothing is sent
            if self.transaction is not None:
                self.transaction.close()
            return
        begun = None
        if self.transaction is not None and self.first is not None:
            begun = (self.transaction, self.first)
        try:
            self.succeed(await self.alone(begun))
        except Exception as exc:
            self.fail(exc)

    def succeed(self, value: Any) -> None:
        if not self.done.done():  # its caller may have been cancelled
            self.done.set_result(value)

    def fail(self, exc: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(exc)


def _split(records: Sequence[Sequence[Any]], items: Sequence[_Together]) -> list[Rows]:
    """The rows of statements sent together, each statement's own (in the order sent):
    a statement's rows are those that begin with its key, one after another (no two
    statements sent together have the same key)."""
    split: list[Rows] = []
    at = 0
    for item in items:
        start = at
        while at < len(records) and records[at][0] == item.key:
            at += 1
        split.append([tuple(record) for record in records[start:at]])
    if at != len(records):  # a bug; they were written, whose rows are whose is unknown
        raise OutcomeUnknown("rows sent together that no statement sent owns")
    return split


class PostgresTransactor:
    """asyncpg itself, on connections of its own (`pg_connections.py`): SQLAlchemy's pool
    would add a ping per checkout, its own BEGIN and a ROLLBACK on return, round trips the
    message path does without; asyncpg's pool, CPU it does without."""

    writable_ctes = True

    def __init__(self, url: str, pool_size: int = 10) -> None:
        dsn = url.replace("postgresql+asyncpg://", "postgresql://", 1)
        # made when first needed: the app starts while the server is away
        self._connections = Connections(dsn, pool_size)
        self._statements = PostgresStatements()
        # `run_together`: the transactions asked for in this turn of the loop
        self._together: list[_Together] = []
        self._sending: set[asyncio.Task[None]] = set()

    async def run_together(
        self, order: str, steps: Callable[P, Steps[T]], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """Gathered with the others asked for in this turn of the loop; those of the same
        first statement (`alone` and `keyed_by`) are sent with one `fetchmany`: one
        round trip and one transaction for them all, in the order of `order`, and each
        reads its own rows. asyncpg's fetchmany is atomic: if it fails, none was
        written, and each runs again alone (`run`), to the outcome it would have had; if
        the connection is lost under it, each may have been written, and each raises
        `ConnectionLost` (a settlement's retry looks whether it was, an opening takes
        itself back). A transaction that goes on after its statement (an opening refused
        at once, which wrote nothing) is run alone from its start. A transaction alone in
        its turn is simply `run`."""
        loop = asyncio.get_running_loop()
        if not self._together:
            loop.call_soon(self._send_together)
        done: asyncio.Future[T] = loop.create_future()
        make = partial(steps, *args, **kwargs)
        self._together.append(_Together(order, make, partial(self._run, make, _name(steps)), done))
        return await done

    def _send_together(self) -> None:
        gathered, self._together = self._together, []
        task = asyncio.get_running_loop().create_task(self._send(gathered))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, items: list[_Together]) -> None:
        try:
            # a caller cancelled before its turn ended sends nothing
            await self._send_now([item for item in items if not item.done.done()])
        except Exception as exc:  # a bug: no caller is left waiting for nothing
            log.exception("transactions sent together failed")
            for item in items:
                item.fail(exc)

    async def _send_now(self, items: list[_Together]) -> None:
        if len(items) <= 1:
            await asyncio.gather(*(item.run_alone() for item in items))
            return
        groups: dict[str, tuple[list[_Together], list[list[object]]]] = {}
        keys: set[tuple[str, object]] = set()
        alone: list[_Together] = []
        for item in sorted(items, key=attrgetter("order")):
            try:
                statement = item.begin(self._statements)
            except Exception as exc:  # its steps failed before their first statement
                item.fail(exc)
                continue
            if statement is None or (statement[0], item.key) in keys:
                alone.append(item)  # not one to send together, or its rows would mix
                continue
            text, values = statement
            keys.add((text, item.key))
            group = groups.setdefault(text, ([], []))
            group[0].append(item)
            group[1].append(values)
        await asyncio.gather(
            *(item.run_alone() for item in alone),
            *(self._send_group(text, *group) for text, group in groups.items()),
        )

    async def _send_group(
        self, text: str, items: list[_Together], values: list[list[object]]
    ) -> None:
        alone = items  # one, or none was written: each alone
        if len(items) > 1:
            try:
                records = await self._send_many(text, values)
                rows = _split(records, items) if records is not None else None
            except OutcomeUnknown as unknown:
                for item in items:
                    item.fail(unknown)
                return
            if rows is not None:
                ended = [item.finish(its) for item, its in zip(items, rows, strict=True)]
                alone = [item for item, end in zip(items, ended, strict=True) if not end]
        await asyncio.gather(*(item.run_alone() for item in alone))

    async def _send_many(
        self, text: str, values: list[list[object]]
    ) -> Sequence[Sequence[Any]] | None:
        """All the rows returned if all were written; None if none was (then each runs
        alone): PostgreSQL refused them (and rolled them back), or a value could not be
        sent (asyncpg then rolls back what it sent). Anything else after they were sent
        leaves each one's outcome unknown (`OutcomeUnknown`)."""
        try:
            async with self._connections.lend() as conn:
                try:
                    records: Sequence[Sequence[Any]] = await conn.fetchmany(text, values)
                except (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, OSError) as exc:
                    if isinstance(exc, asyncpg.InterfaceError) and not conn.is_closed():
                        raise
                    raise ConnectionLost(f"{type(exc).__name__}: {exc}") from exc
        except (asyncpg.PostgresError, ValueError, TypeError) as exc:  # asyncpg's DataError
            log.info("%d transactions sent together failed (%s): each alone", len(values), exc)
            return None
        except OutcomeUnknown:
            raise
        except Exception as exc:
            raise OutcomeUnknown(f"{type(exc).__name__}: {exc}") from exc
        return records

    async def run(self, steps: Callable[P, Steps[T]], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run the transaction; one that loses a deadlock or a serialization race is run
        again from the start (its steps anew) a few times, after a short random wait so
        the two do not meet again: a lost race is never an error for the client."""
        return await self._run(partial(steps, *args, **kwargs), _name(steps))

    async def _run(
        self, make: Callable[[], Steps[T]], name: str, begun: _Begun[T] | None = None
    ) -> T:
        """`run` of the steps `make()`; `begun`: their first attempt, already begun (its
        first statement taken, not sent)."""
        attempt = 1
        while True:
            steps, first = begun if begun is not None else (make(), None)
            begun = None
            try:
                async with self._connections.lend() as conn:
                    try:
                        return await run_asyncpg(conn, self._statements, steps, first)
                    except (
                        asyncpg.PostgresConnectionError,
                        asyncpg.InterfaceError,
                        OSError,
                    ) as exc:
                        # a transaction's rollback on the lost connection raises
                        # InterfaceError ("the underlying connection is closed") over
                        # the loss itself; an InterfaceError on a live one is a bug
                        if isinstance(exc, asyncpg.InterfaceError) and not conn.is_closed():
                            raise
                        raise ConnectionLost(f"{type(exc).__name__}: {exc}") from exc
            except asyncpg.PostgresError as exc:
                if exc.sqlstate not in RACE_LOST or attempt == RACE_ATTEMPTS:
                    raise
                log.info("%s lost a race (%s), attempt %d", name, exc.sqlstate, attempt)
            await asyncio.sleep(random.uniform(0, RACE_BACKOFF_SECONDS * 2 ** (attempt - 1)))
            attempt += 1

    async def caught_up(self) -> None:
        # those of this turn's gathering whose callers were cancelled are never sent; the
        # others are out, each in a task of `_sending` (`run` is its caller's own await)
        await asyncio.gather(*self._sending, return_exceptions=True)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        # the transactions sent together are answered before their connections close
        await asyncio.gather(*self._sending, return_exceptions=True)
        await self._connections.close()


def make_transactor(
    url: str,
    busy_timeout_ms: int,
    *,
    sqlite_trace_file: str | None = None,
    preload: Sequence[str] = (),
    constants: Sequence[object] = (),
) -> Transactor:
    """The transactor for `url`. `preload` names the modules of the transactions the
    application runs: the SQLite writer process imports them as it starts, so that the
    first exchange does not wait for the imports. `constants`: objects many transactions
    take, unchanged while the server runs; the writer process is sent them once."""
    if url.startswith("sqlite"):
        return SqliteTransactor(
            url,
            busy_timeout_ms,
            trace_file=sqlite_trace_file,
            preload=preload,
            constants=constants,
        )
    return PostgresTransactor(url)
