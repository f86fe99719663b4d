"""The process that writes SQLite for one chatmeter worker.

SQLite's own work (stepping statements, writing the WAL, checkpointing it) was half of an
exchange's CPU on the event loop. `sqlite3` lets go of the GIL while SQLite works, but
the Python between two statements needs it back: on a thread of the server the writer
took turns with the loop instead of running beside it. A process of its own runs on the
other core while the loop serves streams, and a checkpoint's fsync no longer stalls every
stream of the worker.

The server (`transactor.SqliteTransactor`) writes jobs to the process's stdin, those
asked for in one turn of its loop as one frame (`encode_jobs`): their ids, then the
pickled list of their `(function, args, kwargs)`, each a transaction's steps
(`steps.py`), a module-level function the process imports. The process runs the jobs
that arrived together in one transaction with one COMMIT (`commit_batch`: each in a
SAVEPOINT, so a refused one rolls back alone), then answers on stdout with one frame:
the pickled `[(job_id, ok, result or exception)]`. Its first frame, an empty one, says
it is ready: the server backs off from starting again a process that ends before that.
It ends when stdin closes, which is also what happens when the server dies.

What every frame would carry again, the worker's configuration of openings and plans, is
sent once, first, as a frame of no jobs (`Constants`), read before the process says it is
ready; the frames then name each of those objects by its number. Pickling the opening's
rules took ~50 us and reading them ~25 us, for every frame.

A quiet server does not wait for this process: a lone transaction while nothing is in
hand here commits on the server's own connection, which leaves checkpoints to this
process (`Writer.checkpoint`, when idle; SQLite's automatic one after its own commits).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import pickle
import select
import signal
import sqlite3
import struct
import sys
from collections.abc import Callable, Mapping
from functools import partial
from operator import attrgetter
from types import MappingProxyType
from typing import Any, TextIO, cast

from chatmeter.collector import collect_young_less_often
from chatmeter.db.steps import Steps, run_sqlite

log = logging.getLogger("chatmeter.db")

# at most this many jobs share one commit, and hear back together: a burst of requests
# (50 clients arriving at once) is answered a commit at a time, not all at the end
MAX_BATCH = 16
BATCH_HEADER = struct.Struct(">II")  # payload length, how many jobs
JOB_ID = struct.Struct(">Q")
ANSWER_HEADER = struct.Struct(">I")  # payload length
# with nothing asked for this long, the process checkpoints the WAL
IDLE_SECONDS = 0.5
# how long that checkpoint waits for a write or a read of older frames to end; if they do
# not, it copies what it can and the WAL starts over at a later one
CHECKPOINT_WAIT_MS = 100

Outcome = tuple[bool, Any]  # (True, result) or (False, exception)


def sqlite_path(url: str) -> str:
    """The file of a `sqlite+aiosqlite:///path` URL."""
    return url.split(":///", 1)[1].split("?", 1)[0] or ":memory:"


def connect_sqlite(path: str, busy_timeout_ms: int) -> sqlite3.Connection:
    """A connection for write transactions, set up as the engine's are (WAL, foreign
    keys); BEGIN and COMMIT are said explicitly."""
    conn = sqlite3.connect(path, timeout=busy_timeout_ms / 1000, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
    # lower() as PostgreSQL's: every letter, not ASCII only (the admin's search by id)
    conn.create_function("lower", 1, _lower, deterministic=True)
    return conn


def _lower(value: str | bytes | int | float | None) -> str | bytes | int | float | None:
    return value.lower() if isinstance(value, str) else value


def commit_batch(conn: sqlite3.Connection, batch: list[Callable[[], Steps[Any]]]) -> list[Outcome]:
    """Run each transaction of `batch` in the transaction the caller began, then COMMIT
    once. One that raises is rolled back alone and gets its exception; the others
    commit. Raises, having rolled back, if the database fails.

    Transactions are run together first, with nothing between them: if none raises,
    that is the whole cost. If one does (a refusal, rare), everything is rolled back and
    run again, each in a SAVEPOINT of its own (two statements more each), so that the
    refused one rolls back alone."""
    try:
        if len(batch) > 1:
            together = _all_or_nothing(conn, batch)
            if together is not None:
                conn.execute("COMMIT")
                return together
            conn.execute("BEGIN IMMEDIATE")
        outcomes = _each_alone(conn, batch)
        if conn.in_transaction:  # not when a lone transaction raised: rolled back
            conn.execute("COMMIT")
        return outcomes
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _all_or_nothing(
    conn: sqlite3.Connection, batch: list[Callable[[], Steps[Any]]]
) -> list[Outcome] | None:
    """Every transaction's result, or None, with all of them rolled back, if one raised."""
    outcomes: list[Outcome] = []
    for steps in batch:
        try:
            outcomes.append((True, run_sqlite(conn, steps())))
        except Exception:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            return None
    return outcomes


def _each_alone(conn: sqlite3.Connection, batch: list[Callable[[], Steps[Any]]]) -> list[Outcome]:
    """Each transaction in a SAVEPOINT of its own (none for a batch of one)."""
    if len(batch) == 1:  # nothing to keep apart: no savepoint
        try:
            return [(True, run_sqlite(conn, batch[0]()))]
        except Exception as exc:
            if conn.in_transaction:  # SQLite rolls back by itself on IOERR, FULL...
                conn.execute("ROLLBACK")
            return [(False, exc)]
    outcomes: list[Outcome] = []
    for steps in batch:
        conn.execute("SAVEPOINT job")
        try:
            outcomes.append((True, run_sqlite(conn, steps())))
            conn.execute("RELEASE job")
        except Exception as exc:
            if not conn.in_transaction:
                raise  # SQLite rolled the whole batch back: every job fails
            conn.execute("ROLLBACK TO job")
            conn.execute("RELEASE job")
            outcomes.append((False, exc))
    return outcomes


Frame = tuple[list[int], bytes]  # job ids, and the pickled list of their calls


class JobReader:
    """Reads frames of jobs from a pipe: everything that has arrived, as one list."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._buffer = bytearray()
        self.closed = False

    def read(self, on_idle: Callable[[], None]) -> list[Frame]:
        """Wait for at least one complete frame, then take every one already here;
        `on_idle()` every IDLE_SECONDS meanwhile. Empty once the pipe is closed."""
        frames: list[Frame] = []
        while not frames and not self.closed:
            while not select.select([self._fd], [], [], IDLE_SECONDS)[0]:
                on_idle()
            self._fill()
            while not self.closed and select.select([self._fd], [], [], 0)[0]:
                self._fill()
            frames = self._take_complete()
        return frames

    def _fill(self) -> None:
        data = os.read(self._fd, 1 << 20)
        if not data:
            self.closed = True
        self._buffer += data

    def _take_complete(self) -> list[Frame]:
        frames = []
        start = 0
        buffer = self._buffer
        while len(buffer) - start >= BATCH_HEADER.size:
            length, count = BATCH_HEADER.unpack_from(buffer, start)
            ids_at = start + BATCH_HEADER.size
            payload_at = ids_at + count * JOB_ID.size
            end = payload_at + length
            if end > len(buffer):
                break
            ids = [JOB_ID.unpack_from(buffer, ids_at + i * JOB_ID.size)[0] for i in range(count)]
            frames.append((ids, bytes(buffer[payload_at:end])))
            start = end
        del buffer[:start]
        return frames


# how a frame names one of the constants (`_Pickler`, `_Unpickler`)
_CONSTANT = ("chatmeter.db.sqlite_process", "constant")


def constant(number: int) -> Any:
    """What a frame calls to get constant `number`: only the process's unpickler knows
    them, and it answers this name itself."""
    raise RuntimeError("a constant is read by the writer process's unpickler only")


class _Pickler(pickle.Pickler):
    """Pickles a slots dataclass (the values transactions take and return) as its class
    and the values of its `__init__` fields in order: about four times faster than the
    state `dataclasses` pickles by default, which looks the fields up on every call.
    Rebuilt by calling the class with them, so what `__post_init__` derives (fields with
    init=False) is derived again on the other side. A constant (the very object, by
    `numbers`: id -> number) is written as its number. `forms`: what is known of each
    class so far (`_init_values`), kept by the `Encoder` from one pickle to the next."""

    def __init__(
        self,
        file: io.BytesIO,
        numbers: Mapping[int, int],
        forms: dict[type, _Form | None],
    ) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._numbers = numbers
        self._forms = forms

    def reducer_override(self, obj: Any) -> Any:
        number = self._numbers.get(id(obj))
        if number is not None:
            return (constant, (number,))
        cls = type(obj)
        try:
            form = self._forms[cls]
        except KeyError:
            form = self._forms[cls] = _init_values(cls)
        if form is None:
            return NotImplemented
        return (cls, form(obj))


_Form = Callable[[Any], tuple[Any, ...]]


def _init_values(cls: type) -> _Form | None:
    """The values to call `cls` with again, in its `__init__`'s order, if it is a slots
    dataclass whose fields `__init__` takes by position; None for any other class."""
    if "__slots__" not in vars(cls) or not dataclasses.is_dataclass(cls):
        return None
    fields = [field for field in dataclasses.fields(cls) if field.init]
    if any(field.kw_only for field in fields):
        return None
    names = [field.name for field in fields]
    if not names:
        return lambda obj: ()
    if len(names) == 1:  # attrgetter of one name gives the value, not a tuple
        getter = attrgetter(names[0])
        return lambda obj: (getter(obj),)
    return cast(_Form, attrgetter(*names))


class _Unpickler(pickle.Unpickler):
    """Reads a frame of calls, giving the constants it names."""

    def __init__(self, payload: bytes, constants: tuple[Any, ...]) -> None:
        super().__init__(io.BytesIO(payload))
        self._constants = constants

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == _CONSTANT:
            return self._constants.__getitem__
        return super().find_class(module, name)


class Encoder:
    """Pickles values for the other side of the pipe (`_Pickler`), naming the constants
    of `numbers` (id -> number) by their number. It learns once per class how to take
    its objects apart: one encoder serves a transactor, or the process, for its life."""

    def __init__(self, numbers: Mapping[int, int] = MappingProxyType({})) -> None:
        self._numbers = numbers
        self._forms: dict[type, _Form | None] = {}

    def dumps(self, value: Any) -> bytes:
        buffer = io.BytesIO()
        _Pickler(buffer, self._numbers, self._forms).dump(value)
        return buffer.getvalue()


# what `Constants` refuses: pickle never asks `reducer_override` about these, so they
# could not be named by number
_UNNAMEABLE = (type(None), bool, int, float, complex, str, bytes, tuple, list, dict, set, frozenset)


class Constants:
    """Objects the server's transactions take again and again (the opening's rules, the
    plans): sent to the process once, as it starts (`frame`), then named by number in
    every frame of calls (`numbers`). The process keeps what it was sent, so a constant
    must not change while the server runs (a cache that answers the same is fine)."""

    def __init__(self, values: tuple[Any, ...] = ()) -> None:
        for value in values:
            if type(value) in _UNNAMEABLE:
                raise TypeError(f"a {type(value).__name__} cannot be a constant")
        self._values = values  # held: an id names its object only while it lives
        self.numbers: Mapping[int, int] = MappingProxyType(
            {id(value): number for number, value in enumerate(values)}
        )
        self.encoder = Encoder(self.numbers)  # what the server's frames are pickled with
        # once: constants that do not pickle fail here (not with `encoder`, which would
        # write each of them as its number)
        payload = Encoder().dumps(values)
        self.frame = BATCH_HEADER.pack(len(payload), 0) + payload  # no jobs: the constants


def read_constants(reader: JobReader) -> tuple[Any, ...]:
    """The first frame from the server, `Constants.frame`; () if the server is gone."""
    frames = reader.read(on_idle=lambda: None)
    if not frames:
        return ()
    if len(frames) > 1 or frames[0][0]:
        raise RuntimeError("the server sent jobs before its constants")
    constants: tuple[Any, ...] = pickle.loads(frames[0][1])
    return constants


def encode_jobs(ids: list[int], calls: list[tuple[Any, ...]], constants: Constants) -> bytes:
    """One frame for jobs sent together. One pickle for all of them: what they share
    (the same function, the same settlement's values) is written once."""
    payload = constants.encoder.dumps(calls)
    return (
        BATCH_HEADER.pack(len(payload), len(ids))
        + b"".join(JOB_ID.pack(job_id) for job_id in ids)
        + payload
    )


class Writer:
    """The connection this process writes with, made again after the database failed."""

    def __init__(self, path: str, busy_timeout_ms: int, trace: TextIO | None = None) -> None:
        self._path = path
        self._busy_timeout_ms = busy_timeout_ms
        self._trace = trace
        self._conn: sqlite3.Connection | None = None

    def connection(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = connect_sqlite(self._path, self._busy_timeout_ms)
            if self._trace is not None:
                trace = self._trace
                self._conn.set_trace_callback(lambda statement: print(statement, file=trace))
        return self._conn

    def checkpoint(self) -> None:
        """Copy the WAL into the database while nothing else is asked of us, so that the
        next write starts it over. The server commits small transactions on its own
        connection when this process is idle, and that connection leaves checkpoints to
        this one. A PASSIVE checkpoint never let the WAL start over while the server
        committed without a pause (one client asking as fast as it could): new frames
        came before the next write, and the WAL grew by each exchange's pages (2.3 GB in
        30 s; every read then searched its index). So a PASSIVE checkpoint copies first,
        beside the server's commits, then a RESTART copies what they added meanwhile
        holding the write lock (the server's commits find it taken and come here, after
        it: a few milliseconds, where a RESTART alone held it for the whole copy and its
        sync, 25 ms at p99 for one client), and waits for readers of older frames; for
        at most `CHECKPOINT_WAIT_MS`, not the busy timeout, so that a long read does not
        hold up every write."""
        try:
            conn = self.connection()
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            conn.execute(f"PRAGMA busy_timeout={CHECKPOINT_WAIT_MS}")
            try:
                conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchall()
            finally:
                conn.execute(f"PRAGMA busy_timeout={int(self._busy_timeout_ms)}")
        except sqlite3.Error as exc:
            log.warning("WAL checkpoint failed: %s", exc)
            self.drop()

    def drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


Job = tuple[int, Callable[[], Steps[Any]]]
Answer = tuple[int, bool, Any]  # job id, (True, result) or (False, exception)


def unpack(frames: list[Frame], constants: tuple[Any, ...]) -> tuple[list[Job], list[Answer]]:
    """The jobs of `frames`, and the answers of those that could not be read."""
    jobs: list[Job] = []
    failed: list[Answer] = []
    for ids, payload in frames:
        try:
            calls = _Unpickler(payload, constants).load()
        except Exception as exc:  # a function this process cannot import: those jobs fail
            failed += [(job_id, False, exc) for job_id in ids]
            continue
        for job_id, (function, args, kwargs) in zip(ids, calls, strict=True):
            jobs.append((job_id, partial(function, *args, **kwargs)))
    return jobs, failed


def run_jobs(writer: Writer, jobs: list[Job]) -> list[Answer]:
    """Run `jobs` in one transaction; the answers, one per job."""
    try:
        conn = writer.connection()
        conn.execute("BEGIN IMMEDIATE")
        outcomes = commit_batch(conn, [steps for _, steps in jobs])
    except Exception as exc:  # the database itself failed: every job fails
        outcomes = [(False, exc)] * len(jobs)
        writer.drop()  # connect again for the next batch
    return [(job_id, ok, value) for (job_id, _), (ok, value) in zip(jobs, outcomes, strict=True)]


def encode_answers(answers: list[Answer], encoder: Encoder) -> bytes:
    """One frame for `answers`. An exception the server could not rebuild (one whose
    constructor does not take its `args`) is sent as a RuntimeError naming it."""
    sendable = [
        (job_id, ok, value if ok or _round_trips(value, encoder) else RuntimeError(_named(value)))
        for job_id, ok, value in answers
    ]
    try:
        payload = encoder.dumps(sendable)
    except Exception:  # a result that does not pickle: a bug, said to that caller
        payload = encoder.dumps(
            [
                (job_id, ok, value)
                if _round_trips(value, encoder)
                else (job_id, False, _unsent(value))
                for job_id, ok, value in sendable
            ]
        )
    return ANSWER_HEADER.pack(len(payload)) + payload


def _round_trips(value: Any, encoder: Encoder) -> bool:
    try:
        pickle.loads(encoder.dumps(value))
    except Exception:
        return False
    return True


def _named(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _unsent(value: Any) -> RuntimeError:
    return RuntimeError(f"the writer process could not send back {type(value).__name__}")


def serve(writer: Writer, reader: JobReader, constants: tuple[Any, ...], fd_out: int) -> None:
    """Answer jobs until the server closes the pipe."""
    encoder = Encoder()
    while frames := reader.read(on_idle=writer.checkpoint):
        jobs, unreadable = unpack(frames, constants)
        if unreadable:
            _write_all(fd_out, encode_answers(unreadable, encoder))
        for start in range(0, len(jobs), MAX_BATCH):
            batch = jobs[start : start + MAX_BATCH]
            _write_all(fd_out, encode_answers(run_jobs(writer, batch), encoder))
    writer.drop()


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data) :]


def main() -> None:
    # Ctrl-C, or a service manager's SIGTERM, may reach the whole process group: the
    # server shuts down, settles what is streaming and closes our stdin; stopping here
    # first would fail those settlements. A server that dies closes stdin too.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING)
    # the trace file ("" for none): every statement, one per line (sqlite_trace_file)
    path, busy_timeout_ms, trace_path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    answers = os.dup(1)
    os.dup2(2, 1)  # stdout is the answers' pipe: anything else printed goes to stderr
    for module in sys.argv[4:]:  # the transactions' modules, imported before the first job
        __import__(module)
    collect_young_less_often()
    reader = JobReader(0)
    try:
        constants = read_constants(reader)
    except Exception:  # the server then sees a process that ended before it was ready
        log.exception("the server's constants could not be read")
        sys.exit(1)
    # ready: a process that ends before this failed
    _write_all(answers, encode_answers([], Encoder()))
    with contextlib.ExitStack() as stack:
        trace = stack.enter_context(open(trace_path, "a", buffering=1)) if trace_path else None
        serve(Writer(path, busy_timeout_ms, trace), reader, constants, answers)


if __name__ == "__main__":
    main()
