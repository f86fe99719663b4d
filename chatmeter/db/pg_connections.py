"""The PostgreSQL transactor's connections: at most `size`, made when first needed and
lent one transaction at a time.

asyncpg's own Pool costs ~45 µs of CPU per acquire and release (an inactivity timer, a
reset hook, timeouts and a holder object each time: ~65-80 µs a transaction against ~25 µs
here, in a microbenchmark of `SELECT $1` at 1 and at 50 at once), and the message path
lends a connection twice per exchange. This does only the lending. A connection that
comes back closed, inside a transaction, from a cancelled task (its query may still be
cancelling) or from a failure of the driver or the network is closed and forgotten; the
next borrower makes a new one. One whose statement the server refused (a constraint, a
lost race) or whose transaction our steps refused (a 403) is lent again."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from types import TracebackType

import asyncpg

CONNECT_TIMEOUT_SECONDS = 5.0
# The message path's statements find their rows by key, through an index. PostgreSQL plans
# a prepared statement once (a generic plan), from the statistics of that moment. Planned
# while a chat held ~10 messages on average, the opening's read of a chat's last messages
# became a bitmap scan and a sort of all the chat's messages (on a smaller table, a
# sequential scan of the whole table), kept until the next ANALYZE: its cost grew with
# every message (1.6 ms an opening instead of 0.27 ms in a benchmark), and with a long
# chat whatever the averages. Without those two plans, the index read backwards from the
# newest message is the plan at any size. The statements that read much of a table (the
# usage summary, the admin search: `Sql.wide`) get them back for their transaction.
# JIT compiling is off too: it is chosen by a plan's cost, and a plan with no index to use
# costs the switches' penalty (10^10), so every run of it would compile.
PLANNER_SETTINGS = "SET enable_bitmapscan = off; SET enable_seqscan = off; SET jit = off"
# what leaves a connection in a state not to trust: the driver's own failures (a protocol
# state it cannot leave), the network's, a timeout in the middle of a statement
UNTRUSTED = (asyncpg.InterfaceError, asyncpg.InternalClientError, OSError, TimeoutError)


class Connections:
    def __init__(self, dsn: str, size: int) -> None:
        self._dsn = dsn
        self._size = size
        self._idle: list[asyncpg.Connection] = []
        self._open = 0  # idle, lent or being made
        # borrowers waiting for a connection (or, given None, for a free place to make one)
        self._waiters: collections.deque[asyncio.Future[asyncpg.Connection | None]] = (
            collections.deque()
        )
        self._closed = False

    def lend(self) -> Loan:
        """`async with connections.lend() as conn:` one transaction's connection."""
        return Loan(self)

    async def acquire(self) -> asyncpg.Connection:
        while True:
            if self._closed:
                raise ConnectionError("the PostgreSQL connections are closed")
            while self._idle:
                conn = self._idle.pop()
                if not conn.is_closed():
                    return conn
                self._open -= 1  # the server closed it while it was idle
            if self._open < self._size:
                self._open += 1
                try:
                    return await connect(self._dsn)
                except BaseException:
                    self._open -= 1
                    self._hand(None)  # the place is free again, for whoever waits
                    raise
            waiter: asyncio.Future[asyncpg.Connection | None] = (
                asyncio.get_running_loop().create_future()
            )
            self._waiters.append(waiter)
            try:
                handed = await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():  # handed over as we were cancelled
                    self._give_back(waiter.result())
                raise
            if handed is not None:
                return handed

    def release(self, conn: asyncpg.Connection, *, reusable: bool) -> None:
        if not reusable or self._closed or conn.is_closed() or conn.is_in_transaction():
            conn.terminate()
            self._open -= 1
            self._hand(None)
            return
        self._give_back(conn)

    def _give_back(self, conn: asyncpg.Connection | None) -> None:
        if not self._hand(conn) and conn is not None:
            self._idle.append(conn)

    def _hand(self, conn: asyncpg.Connection | None) -> bool:
        """Give `conn` (None: a free place) to the first borrower still waiting."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return True
        return False

    async def close(self) -> None:
        """Close the idle connections; those lent are closed as they come back."""
        self._closed = True
        idle, self._idle = self._idle, []
        self._open -= len(idle)
        for conn in idle:
            with contextlib.suppress(Exception):
                await conn.close(timeout=CONNECT_TIMEOUT_SECONDS)
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(ConnectionError("the PostgreSQL connections are closed"))
        self._waiters.clear()


async def connect(dsn: str) -> asyncpg.Connection:
    """A connection planning as chatmeter's statements need (`PLANNER_SETTINGS`)."""
    conn = await asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT_SECONDS)
    try:
        await conn.execute(PLANNER_SETTINGS, timeout=CONNECT_TIMEOUT_SECONDS)
    except BaseException:
        conn.terminate()
        raise
    return conn


class Loan:
    """A connection for the length of an `async with`: given back unless the block was
    cancelled (a query may be cancelling), failed in the driver or the network, or left
    it in a transaction."""

    def __init__(self, connections: Connections) -> None:
        self._connections = connections
        self._conn: asyncpg.Connection | None = None

    async def __aenter__(self) -> asyncpg.Connection:
        self._conn = await self._connections.acquire()
        return self._conn

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        assert self._conn is not None
        trusted = kind is None or (issubclass(kind, Exception) and not issubclass(kind, UNTRUSTED))
        self._connections.release(self._conn, reusable=trusted)
        self._conn = None
