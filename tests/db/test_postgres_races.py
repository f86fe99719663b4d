"""PostgreSQL: the message path's transactions never deadlock one another, and a
transaction that still loses a race is run again instead of failing (issue 12, break 1).

The lock-order tests drive the real transactions (`open_steps`, `settle_steps`, the
sweeper) a statement at a time on two connections, in every interleaving that starts
one of them some statements ahead and then alternates; a statement that waits for a
lock lets the other go on. Two transactions that take the same rows in opposite orders
end with both waiting, and PostgreSQL fails one with a deadlock (40P01)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest

from chatmeter.chats.store import deactivate_chat
from chatmeter.db.steps import Conflict, PostgresStatements, Sql, Steps
from chatmeter.db.tables import utcnow
from chatmeter.db.transactor import RACE_ATTEMPTS, ConnectionLost, PostgresTransactor
from chatmeter.errors import DATABASE_UNAVAILABLE, ApiError, database_down_response
from chatmeter.ids import new_id
from chatmeter.metering.plans import PlanBook
from chatmeter.metering.reservations import release_expired, renew_leases, request_stop
from chatmeter.metering.settlement import Settlement, settle, settle_steps
from chatmeter.providers.base import Usage
from chatmeter.streaming.opening import (
    ModelLimits,
    Opened,
    OpeningRules,
    open_steps,
    undo_opening,
)
from tests.conftest import auth, make_settings
from tests.support.outage import LostAnswerProxy
from tests.support.postgres import PostgresServer
from tests.support.server import serve
from tests.support.waiting import eventually

LIMIT = 1_000_000


@pytest.fixture
async def dsn(postgres: PostgresServer, postgres_template: str) -> str:
    name = f"r_{uuid.uuid4().hex[:12]}"
    postgres.createdb(name, postgres_template)
    return postgres.url(name).replace("postgresql+asyncpg://", "postgresql://", 1)


@pytest.fixture
async def transactor(dsn: str) -> AsyncIterator[PostgresTransactor]:
    running = PostgresTransactor(dsn, pool_size=4)
    try:
        yield running
    finally:
        await running.close()


RULES = OpeningRules(
    models={"m": ModelLimits("Be brief.", context_window=100_000, max_output_tokens=200)},
    history_messages=20,
    plans=PlanBook.of(make_settings("sqlite+aiosqlite://", default_token_limit=LIMIT)),
    worker_id="w1",
    reservation_ttl_seconds=120.0,
)


async def new_chat(conn: asyncpg.Connection, user_id: str) -> uuid.UUID:
    chat_id = new_id()
    now = utcnow()
    await conn.execute(
        "INSERT INTO chats (chat_id, user_id, title, model, is_active, created_at, updated_at) "
        "VALUES ($1, $2, 't', 'm', true, $3, $3)",
        chat_id,
        user_id,
        now,
    )
    return chat_id


def settlement_of(opened: Opened, user_id: str, chat_id: uuid.UUID) -> Settlement:
    asked_at = opened.user_message_at
    assert asked_at is not None  # a chat's opening saved the user message
    return Settlement(
        user_id=user_id,
        chat_id=chat_id,
        model=opened.model,
        reservation_id=opened.reservation.reservation_id,
        message_id=new_id(),
        content="a reply",
        status="complete",
        finish_reason="stop",
        usage=Usage(prompt_tokens=10, completion_tokens=5),
        source="provider",
        created_at=asked_at + timedelta(seconds=1),
    )


# driving transactions a statement at a time


@dataclass(eq=False)
class Driven:
    """Transactions run one after another on one connection, a statement per step, as
    `steps.run_asyncpg` runs them: statements marked `alone` outside a transaction until
    one is not, which begins the transaction that the rest runs in."""

    conn: asyncpg.Connection
    transactions: list[Callable[[], Steps[Any]]]
    statements: PostgresStatements = field(default_factory=PostgresStatements)
    errors: list[BaseException] = field(default_factory=list)
    task: asyncio.Task[None] | None = None
    _steps: Steps[Any] | None = None
    _statement: Sql | None = None
    _transaction: Any = None

    @property
    def finished(self) -> bool:
        return not self.transactions and self._steps is None

    async def step(self) -> None:
        """Run the next statement (beginning or committing transactions as needed)."""
        if self._steps is None:
            self._steps = self.transactions.pop(0)()
            self._statement = next(self._steps)
            return  # the first statement runs on the next step
        assert self._statement is not None
        try:
            if self._transaction is None and not self._statement.alone:
                self._transaction = self.conn.transaction()
                await self._transaction.start()
            text, args = self.statements.convert(self._statement)
            try:
                records = await self.conn.fetch(text, *args)
            except asyncpg.UniqueViolationError as exc:
                if self._transaction is not None:
                    raise
                self._statement = self._steps.throw(Conflict(str(exc)))
                return
            self._statement = self._steps.send([tuple(r) for r in records])
        except StopIteration:
            await self._end(commit=True)
        except (ApiError, asyncpg.PostgresError) as exc:
            self.errors.append(exc)
            await self._end(commit=False)

    async def _end(self, *, commit: bool) -> None:
        if self._transaction is not None:
            if commit:
                await self._transaction.commit()
            else:
                await self._transaction.rollback()
        self._steps = None
        self._statement = None
        self._transaction = None


async def waits_for_a_lock(monitor: asyncpg.Connection, conn: asyncpg.Connection) -> bool:
    rows = await monitor.fetch(
        "SELECT 1 FROM pg_locks WHERE pid = $1 AND NOT granted", conn.get_server_pid()
    )
    return bool(rows)


async def turn(monitor: asyncpg.Connection, side: Driven) -> bool:
    """Let `side` run a statement; returns False if it waits for a lock instead."""
    if side.task is None:
        side.task = asyncio.get_running_loop().create_task(side.step())
    while not side.task.done():
        if await waits_for_a_lock(monitor, side.conn):
            return False
        await asyncio.sleep(0.002)
    side.task.result()
    side.task = None
    return True


async def interleave(
    monitor: asyncpg.Connection, first: Driven, second: Driven, ahead: int
) -> None:
    """`first` runs `ahead` statements, then the two alternate; a side that waits for a
    lock yields its turn. If both wait, the first to be released goes on."""
    for _ in range(ahead):
        if first.finished or not await turn(monitor, first):
            break
    sides = [second, first]
    while not (first.finished and second.finished):
        progressed = False
        for side in sides:
            if not side.finished and await turn(monitor, side):
                progressed = True
        if not progressed:  # both wait for a lock: one of them must be released
            tasks = {side.task for side in sides if side.task is not None}
            await asyncio.wait_for(asyncio.wait(tasks, return_when="FIRST_COMPLETED"), 60)


@contextlib.asynccontextmanager
async def connections(dsn: str, count: int) -> AsyncIterator[list[asyncpg.Connection]]:
    conns = [await asyncpg.connect(dsn) for _ in range(count)]
    try:
        yield conns
    finally:
        for conn in conns:
            await conn.close()


def deadlocks(sides: Sequence[Driven]) -> list[BaseException]:
    return [e for side in sides for e in side.errors if isinstance(e, asyncpg.PostgresError)]


async def reserved_balance(conn: asyncpg.Connection, user_id: str) -> tuple[int, int]:
    """The user's reserved_tokens and the sum of the user's reservation rows."""
    reserved = await conn.fetchval(
        "SELECT reserved_tokens FROM user_usage WHERE user_id = $1", user_id
    )
    held = await conn.fetchval(
        "SELECT coalesce(sum(tokens), 0) FROM reservations WHERE user_id = $1", user_id
    )
    return int(reserved), int(held)


INTERLEAVINGS = [(starter, ahead) for starter in ("a", "b") for ahead in range(8)]


@pytest.mark.parametrize(("starter", "ahead"), INTERLEAVINGS)
async def test_a_message_right_after_a_settlement_never_deadlocks(
    dsn: str, transactor: PostgresTransactor, starter: str, ahead: int
) -> None:
    """The stop-then-message race: the reply's settlement and the next message's
    opening, on the same chat, in any interleaving."""
    user = f"u{uuid.uuid4().hex[:8]}"
    async with connections(dsn, 3) as (one, two, monitor):
        chat = await new_chat(monitor, user)
        opened = await transactor.run(open_steps, RULES, user, chat, "first", None, new_id())
        settle = Driven(one, [lambda: settle_steps(settlement_of(opened, user, chat))])
        opening = Driven(two, [lambda: open_steps(RULES, user, chat, "second", None, new_id())])
        first, second = (opening, settle) if starter == "a" else (settle, opening)
        await interleave(monitor, first, second, ahead)

        assert deadlocks([settle, opening]) == []
        assert settle.errors == []  # the opening may be refused (409) if it came first
        assert all(isinstance(e, ApiError) and e.status == 409 for e in opening.errors)
        reserved, held = await reserved_balance(monitor, user)
        assert reserved == held


@pytest.mark.parametrize(("starter", "ahead"), INTERLEAVINGS)
async def test_the_sweeper_and_a_message_on_an_expired_chat_never_deadlock(
    dsn: str, transactor: PostgresTransactor, starter: str, ahead: int
) -> None:
    """A reservation whose process died: the sweeper releases it while a new message
    on its chat releases it too."""
    user = f"u{uuid.uuid4().hex[:8]}"
    async with connections(dsn, 3) as (one, two, monitor):
        chat = await new_chat(monitor, user)
        await transactor.run(open_steps, RULES, user, chat, "first", None, new_id())
        await monitor.execute(
            "UPDATE reservations SET expires_at = now() - interval '1 hour' WHERE chat_id = $1",
            chat,
        )
        now = utcnow()
        sweeper = Driven(one, [lambda: release_expired(now)])
        opening = Driven(two, [lambda: open_steps(RULES, user, chat, "second", None, new_id())])
        first, second = (opening, sweeper) if starter == "a" else (sweeper, opening)
        await interleave(monitor, first, second, ahead)

        assert deadlocks([sweeper, opening]) == []
        assert opening.errors == []  # the expired reservation never blocks the chat
        reserved, held = await reserved_balance(monitor, user)
        assert reserved == held > 0


@pytest.mark.parametrize(("starter", "ahead"), INTERLEAVINGS)
async def test_housekeeping_and_a_settlement_never_deadlock(
    dsn: str, transactor: PostgresTransactor, starter: str, ahead: int
) -> None:
    """A worker renews the lease of a live reply and sweeps an expired one of the same
    user while the live reply settles."""
    user = f"u{uuid.uuid4().hex[:8]}"
    async with connections(dsn, 3) as (one, two, monitor):
        live_chat, dead_chat = await new_chat(monitor, user), await new_chat(monitor, user)
        live = await transactor.run(open_steps, RULES, user, live_chat, "live", None, new_id())
        await transactor.run(open_steps, RULES, user, dead_chat, "dead", None, new_id())
        await monitor.execute(
            "UPDATE reservations SET expires_at = now() - interval '1 hour' WHERE chat_id = $1",
            dead_chat,
        )
        now = utcnow()
        live_ids = [live.reservation.reservation_id]
        housekeeping = Driven(
            one,
            [
                lambda: renew_leases(live_ids, now + timedelta(minutes=2)),
                lambda: release_expired(now),
            ],
        )
        settled = settlement_of(live, user, live_chat)
        settle = Driven(two, [lambda: settle_steps(settled)])
        first, second = (housekeeping, settle) if starter == "a" else (settle, housekeeping)
        await interleave(monitor, first, second, ahead)

        assert deadlocks([housekeeping, settle]) == []
        assert settle.errors == []
        reserved, held = await reserved_balance(monitor, user)
        assert reserved == held == 0


async def test_a_chat_deleted_between_an_openings_read_and_its_reservation(dsn: str) -> None:
    """When the opening's one statement does not reserve (here: a user not seen before
    has no budget row yet), it has read the chat on its own (alone) and reserves step by
    step: a chat deleted in between (through the route, the way a client deletes it) is
    found deleted (404). The delete used to stop the chat's reply (none yet) and then
    deactivate it, and the opening reserved after that: a reply streamed on,
    unstoppable, in a deleted chat."""
    user = f"u{uuid.uuid4().hex[:8]}"
    rules = replace(RULES, writable_ctes=True)  # PostgreSQL's one-statement opening
    settings = make_settings(dsn.replace("postgresql://", "postgresql+asyncpg://", 1))
    async with connections(dsn, 2) as (one, monitor), serve(settings) as server:
        chat = await new_chat(monitor, user)
        opening = Driven(one, [lambda: open_steps(rules, user, chat, "hello", None, new_id())])
        await opening.step()  # the first statement, ready
        await opening.step()  # reads the chat and its history (active), reserves nothing
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            deleted = await client.delete(f"/api/chat/{chat}", headers=auth(user))
        assert deleted.status_code == 204
        while not opening.finished:
            await opening.step()

        assert api_errors(opening.errors) == [(404, "CHAT_NOT_FOUND")]
        assert await monitor.fetch("SELECT 1 FROM reservations WHERE chat_id = $1", chat) == []


async def test_an_opening_waits_for_a_delete_in_progress(dsn: str) -> None:
    """The delete holds the chat's row FOR UPDATE until it commits, and the opening's
    reservation reads the row FOR KEY SHARE: an opening whose statement read the chat
    before the delete committed cannot reserve with that stale read, it waits and then
    finds the chat deleted (404). Without the locks its one statement saw the chat active
    and reserved while the delete was between deactivating and stopping."""
    user = f"u{uuid.uuid4().hex[:8]}"
    rules = replace(RULES, writable_ctes=True)
    async with connections(dsn, 3) as (one, two, monitor):
        await add_users(monitor, user)
        chat = await new_chat(monitor, user)
        delete = Driven(one, [lambda: deactivate_chat(chat, user, row_locks=True)])
        opening = Driven(two, [lambda: open_steps(rules, user, chat, "hello", None, new_id())])
        for _ in range(3):  # begins, checks ownership, locks the row
            await delete.step()
        await opening.step()  # the one statement, ready
        assert not await turn(monitor, opening)  # it waits for the delete
        await delete.step()  # deactivates and commits
        assert delete.finished and delete.errors == []
        assert opening.task is not None
        await opening.task
        while not opening.finished:
            await opening.step()

        assert api_errors(opening.errors) == [(404, "CHAT_NOT_FOUND")]
        reserved, held = await reserved_balance(monitor, user)
        assert reserved == held == 0


@pytest.mark.parametrize(("starter", "ahead"), INTERLEAVINGS)
async def test_a_delete_and_the_settlement_of_its_reply_never_deadlock(
    dsn: str, transactor: PostgresTransactor, starter: str, ahead: int
) -> None:
    """The delete locks the chat's row FOR UPDATE; the reply's settlement updates it
    while holding the user's row: neither waits for the other in a cycle."""
    user = f"u{uuid.uuid4().hex[:8]}"
    rules = replace(RULES, writable_ctes=True)
    async with connections(dsn, 3) as (one, two, monitor):
        chat = await new_chat(monitor, user)
        opened = await transactor.run(open_steps, rules, user, chat, "first", None, new_id())
        now = utcnow()
        delete = Driven(
            one,
            [lambda: deactivate_chat(chat, user, row_locks=True), lambda: request_stop(chat, now)],
        )
        settle = Driven(two, [lambda: settle_steps(settlement_of(opened, user, chat))])
        first, second = (delete, settle) if starter == "a" else (settle, delete)
        await interleave(monitor, first, second, ahead)

        assert deadlocks([delete, settle]) == []
        assert delete.errors == [] and settle.errors == []
        reserved, held = await reserved_balance(monitor, user)
        assert reserved == held == 0


# the transactor's retry


def lock_two(first: str, second: str, calls: list[int]) -> Steps[int]:
    """Lock two users' rows in the order given."""
    calls.append(1)
    for user_id in (first, second):
        yield Sql(
            "UPDATE user_usage SET total_tokens_used = total_tokens_used + 1 "
            "WHERE user_id = :user_id RETURNING user_id",
            {"user_id": user_id},
        )
    return len(calls)


async def add_users(conn: asyncpg.Connection, *users: str) -> None:
    for user_id in users:
        await conn.execute(
            "INSERT INTO user_usage (user_id, total_tokens_used, token_limit, reserved_tokens, "
            "updated_at) VALUES ($1, 0, $2, 0, now())",
            user_id,
            LIMIT,
        )


async def test_a_transaction_that_loses_a_deadlock_is_run_again(
    dsn: str, transactor: PostgresTransactor
) -> None:
    """A real deadlock: another connection locks b then a while the transactor's
    transaction locks a then b. PostgreSQL fails the transactor's (it waited first and
    checks first); the transactor runs it again, and it commits once."""
    async with connections(dsn, 2) as (other, monitor):
        await add_users(monitor, "a", "b")
        # the other side never detects it: PostgreSQL picks the transactor's transaction
        await other.execute("SET deadlock_timeout = '1min'")
        async with other.transaction():
            await other.execute("UPDATE user_usage SET updated_at = now() WHERE user_id = 'b'")
            calls: list[int] = []
            run = asyncio.get_running_loop().create_task(transactor.run(lock_two, "a", "b", calls))
            await wait_until_someone_waits_for_a_lock(monitor)
            # closes the circle: a is held by the transactor's transaction
            await other.execute("UPDATE user_usage SET updated_at = now() WHERE user_id = 'a'")
        assert await asyncio.wait_for(run, 60) == 2  # the second attempt committed
        totals = await monitor.fetch(
            "SELECT user_id, total_tokens_used FROM user_usage ORDER BY user_id"
        )
        assert [tuple(row) for row in totals] == [("a", 1), ("b", 1)]


async def wait_until_someone_waits_for_a_lock(monitor: asyncpg.Connection) -> None:
    async def waiting() -> bool:
        return bool(await monitor.fetch("SELECT 1 FROM pg_locks WHERE NOT granted"))

    await eventually(waiting, within=30)


def fail_with(sqlstate: str, times: int, calls: list[int]) -> Steps[int]:
    """Raise a real PostgreSQL error with `sqlstate` on the first `times` calls."""
    calls.append(1)
    if len(calls) <= times:
        yield Sql(
            "DO $$ BEGIN RAISE EXCEPTION 'lost' USING ERRCODE = '" + sqlstate + "'; END $$", {}
        )
    yield Sql("UPDATE user_usage SET total_tokens_used = total_tokens_used + 1", {})
    return len(calls)


async def test_a_serialization_failure_is_run_again(
    dsn: str, transactor: PostgresTransactor
) -> None:
    async with connections(dsn, 1) as (monitor,):
        await add_users(monitor, "a")
        calls: list[int] = []
        assert await transactor.run(fail_with, "40001", 2, calls) == 3
        assert await monitor.fetchval("SELECT total_tokens_used FROM user_usage") == 1


async def test_the_retry_is_bounded(dsn: str, transactor: PostgresTransactor) -> None:
    """A transaction that keeps losing is given up, and answered 503 with Retry-After
    (rolled back, nothing changed: worth trying again), not 500."""
    calls: list[int] = []
    with pytest.raises(asyncpg.DeadlockDetectedError) as lost:
        await transactor.run(fail_with, "40P01", 100, calls)
    assert len(calls) == RACE_ATTEMPTS
    assert isinstance(lost.value, DATABASE_UNAVAILABLE)
    answer = database_down_response(lost.value)
    assert answer.status_code == 503 and answer.headers["retry-after"] == "1"


async def test_other_errors_are_not_run_again(dsn: str, transactor: PostgresTransactor) -> None:
    calls: list[int] = []
    with pytest.raises(asyncpg.UniqueViolationError):
        await transactor.run(fail_with, "23505", 100, calls)
    assert calls == [1]


def api_errors(errors: list[BaseException]) -> list[tuple[int, str] | BaseException]:
    """Each error as (status, code) if it is an ApiError, else as it is."""
    return [(e.status, e.code) if isinstance(e, ApiError) else e for e in errors]


# settlements sent together (`PostgresTransactor.run_together`)


async def test_settlements_asked_for_at_once_are_written_in_one_transaction(
    dsn: str, transactor: PostgresTransactor
) -> None:
    """Eight replies of three users settle together: one transaction (their messages
    share the xmin of the transaction that wrote them), in the lock order, and every
    user's books balance as if each had settled alone."""
    users = [f"u{uuid.uuid4().hex[:8]}" for _ in range(3)]
    async with connections(dsn, 1) as (monitor,):
        await add_users(monitor, *users)
        opened = []
        for n in range(8):
            user = users[n % 3]
            chat = await new_chat(monitor, user)
            opening = await transactor.run(open_steps, RULES, user, chat, f"hi {n}", None, new_id())
            opened.append(settlement_of(opening, user, chat))
        await asyncio.gather(*(settle(transactor, s) for s in opened))
        writers = await monitor.fetch(
            "SELECT DISTINCT xmin::text FROM messages WHERE message_id = ANY($1::uuid[])",
            [s.message_id for s in opened],
        )
        assert len(writers) == 1
        for user in users:
            row = await monitor.fetchrow(
                "SELECT total_tokens_used, reserved_tokens, active_replies FROM user_usage "
                "WHERE user_id = $1",
                user,
            )
            ledger = await monitor.fetchval(
                "SELECT sum(total_tokens) FROM usage_events WHERE user_id = $1", user
            )
            mine = [s for s in opened if s.user_id == user]
            assert tuple(row) == (sum(s.usage.total_tokens for s in mine), 0, 0)
            assert ledger == row[0]


async def test_a_settlement_that_fails_among_others_fails_alone(
    dsn: str, transactor: PostgresTransactor
) -> None:
    """The same settlement asked for twice in one turn (a double settle) and a third:
    sent together, the duplicate breaks the messages' key and nothing of the batch is
    written; each then runs alone, to its own outcome: the first copy and the other
    settlement are written once, the second copy is refused (`Conflict`), billed never."""
    user = f"u{uuid.uuid4().hex[:8]}"
    async with connections(dsn, 1) as (monitor,):
        await add_users(monitor, user)
        settlements = []
        for n in range(2):
            chat = await new_chat(monitor, user)
            opening = await transactor.run(open_steps, RULES, user, chat, f"hi {n}", None, new_id())
            settlements.append(settlement_of(opening, user, chat))
        twice, other = settlements
        outcomes = await asyncio.gather(
            settle(transactor, twice),
            settle(transactor, twice),
            settle(transactor, other),
            return_exceptions=True,
        )
        assert [type(o) for o in outcomes].count(type(None)) == 2
        assert [o for o in outcomes if o is not None and not isinstance(o, Conflict)] == []
        total, reserved = await monitor.fetchrow(
            "SELECT total_tokens_used, reserved_tokens FROM user_usage WHERE user_id = $1", user
        )
        assert (total, reserved) == (twice.usage.total_tokens + other.usage.total_tokens, 0)
        billed = await monitor.fetchval(
            "SELECT count(*) FROM usage_events WHERE user_id = $1", user
        )
        assert billed == 2


async def test_a_renewal_passes_over_a_reservation_being_settled(
    dsn: str, transactor: PostgresTransactor
) -> None:
    """The lease renewal does not wait for a reservation another transaction holds (a
    batch of settlements deleting it): it renews the others and leaves that one, so it
    can never close a lock cycle with a batch."""
    user = f"u{uuid.uuid4().hex[:8]}"
    async with connections(dsn, 2) as (holder, monitor):
        await add_users(monitor, user)
        ids = []
        for n in range(2):
            chat = await new_chat(monitor, user)
            opening = await transactor.run(open_steps, RULES, user, chat, f"hi {n}", None, new_id())
            ids.append(opening.reservation.reservation_id)
        held, free = ids
        later = utcnow() + timedelta(hours=1)
        deleting = holder.transaction()
        await deleting.start()
        try:
            await holder.execute("DELETE FROM reservations WHERE reservation_id = $1", held)
            await asyncio.wait_for(
                transactor.run(renew_leases, ids, later, skip_locked=True), timeout=30
            )
            renewed = await monitor.fetch(
                "SELECT reservation_id FROM reservations WHERE expires_at = $1", later
            )
            assert [row[0] for row in renewed] == [free]
        finally:
            await deleting.rollback()


# openings sent together: one statement each, its rows keyed by the user message


async def add_history(conn: asyncpg.Connection, chat_id: uuid.UUID, texts: Sequence[str]) -> None:
    """`texts` as the chat's earlier messages, oldest first, alternating user and reply."""
    now = utcnow()
    for n, text in enumerate(texts):
        await conn.execute(
            "INSERT INTO messages (message_id, chat_id, role, content, tokens_consumed, "
            "status, created_at) VALUES ($1, $2, $3, $4, 0, 'complete', $5)",
            new_id(),
            chat_id,
            "user" if n % 2 == 0 else "assistant",
            text,
            now - timedelta(seconds=len(texts) - n),
        )


def open_together(
    transactor: PostgresTransactor, asked: Sequence[tuple[str, uuid.UUID, uuid.UUID]]
) -> Any:
    """The openings `(user, chat, user message id)` asked for in one turn of the loop,
    with PostgreSQL's one-statement opening."""
    rules = replace(RULES, writable_ctes=True)
    return asyncio.gather(
        *(
            transactor.run_together(user, open_steps, rules, user, chat, f"hi {n}", None, said)
            for n, (user, chat, said) in enumerate(asked)
        ),
        return_exceptions=True,
    )


async def test_openings_asked_for_at_once_are_written_in_one_transaction(
    dsn: str, transactor: PostgresTransactor
) -> None:
    """Six openings of three users, each chat with a history of its own, asked for in
    one turn: one transaction (their user messages share the xmin of the transaction
    that wrote them), and each is answered with its own chat's history and reservation,
    as if it had run alone."""
    users = [f"u{n}{uuid.uuid4().hex[:8]}" for n in range(3)]
    async with connections(dsn, 1) as (monitor,):
        await add_users(monitor, *users)
        asked = []
        for n in range(6):
            chat = await new_chat(monitor, users[n % 3])
            await add_history(monitor, chat, [f"chat {n} said {k}" for k in range(n)])
            asked.append((users[n % 3], chat, new_id()))
        opened = await open_together(transactor, asked)
        writers = await monitor.fetch(
            "SELECT DISTINCT xmin::text FROM messages WHERE message_id = ANY($1::uuid[])",
            [said for *_, said in asked],
        )
        assert len(writers) == 1
        for n, (opening, (_, _, said)) in enumerate(zip(opened, asked, strict=True)):
            assert isinstance(opening, Opened)
            assert [turn.content for turn in opening.request.history] == [
                f"chat {n} said {k}" for k in range(n)
            ]
            assert (opening.request.message, opening.user_message_id) == (f"hi {n}", said)
        for user in users:
            held = sum(o.reservation.tokens for o in opened if o.reservation.user_id == user)
            assert await reserved_balance(monitor, user) == (held, held)


async def test_openings_refused_among_others_are_refused_alone(
    dsn: str, transactor: PostgresTransactor
) -> None:
    """Openings asked for in one turn, three of them refused by the one statement (it
    wrote nothing for them): a chat that does not exist (no rows at all, between the
    others' rows), another user's chat and a user without budget. The others are opened
    with their own rows; each refused one goes on alone to its refusal."""
    a, b, c, d = (f"u{n}{uuid.uuid4().hex[:8]}" for n in range(4))
    async with connections(dsn, 1) as (monitor,):
        await add_users(monitor, a, b, c, d)
        spent = "UPDATE user_usage SET total_tokens_used = token_limit WHERE user_id = $1"
        await monitor.execute(spent, c)
        chats = {user: await new_chat(monitor, user) for user in (a, b, c, d)}
        for chat in chats.values():
            await add_history(monitor, chat, ["earlier", "a reply"])
        asked = [
            (a, chats[a], new_id()),
            (b, new_id(), new_id()),  # no such chat
            (b, chats[a], new_id()),  # a's chat
            (c, chats[c], new_id()),  # no budget
            (d, chats[d], new_id()),
        ]
        outcomes = await open_together(transactor, asked)
        assert api_errors(outcomes[1:4]) == [
            (404, "CHAT_NOT_FOUND"),
            (403, "FORBIDDEN"),
            (403, "TOKEN_BUDGET_EXCEEDED"),
        ]
        for opening in (outcomes[0], outcomes[4]):
            assert isinstance(opening, Opened)
            assert [turn.content for turn in opening.request.history] == ["earlier", "a reply"]
        saved = await monitor.fetch(
            "SELECT message_id FROM messages WHERE message_id = ANY($1::uuid[])",
            [said for *_, said in asked],
        )
        assert sorted(row[0] for row in saved) == sorted([asked[0][2], asked[4][2]])


async def test_an_opening_of_a_held_chat_does_not_hold_back_those_sent_with_it(
    dsn: str, transactor: PostgresTransactor
) -> None:
    """An opening of a chat that already holds a reservation is passed over by the one
    statement (`CHAT_HELD`), not refused by the reservations' unique key, which would
    abort every opening sent with it: the others are written together, in one
    transaction, and only that one is refused (409), alone."""
    users = [f"u{n}{uuid.uuid4().hex[:8]}" for n in range(3)]
    async with connections(dsn, 1) as (monitor,):
        await add_users(monitor, *users)
        chats = [await new_chat(monitor, user) for user in users]
        await transactor.run(open_steps, RULES, users[1], chats[1], "first", None, new_id())
        asked = [(user, chat, new_id()) for user, chat in zip(users, chats, strict=True)]
        outcomes = await open_together(transactor, asked)
        assert api_errors([outcomes[1]]) == [(409, "REPLY_IN_PROGRESS")]
        assert isinstance(outcomes[0], Opened) and isinstance(outcomes[2], Opened)
        writers = await monitor.fetch(
            "SELECT DISTINCT xmin::text FROM messages WHERE message_id = ANY($1::uuid[])",
            [asked[0][2], asked[2][2]],
        )
        assert len(writers) == 1
        saved = await monitor.fetchval(
            "SELECT count(*) FROM messages WHERE message_id = $1", asked[1][2]
        )
        assert saved == 0


def echo(key: str, n: int) -> Steps[list[tuple[Any, ...]]]:
    """A read whose one row begins with its key."""
    return (
        yield Sql(
            "SELECT CAST(:key AS TEXT), CAST(:n AS INT)",
            {"key": key, "n": n},
            alone=True,
            keyed_by="key",
        )
    )


async def test_statements_with_the_same_key_are_not_sent_together(
    transactor: PostgresTransactor,
) -> None:
    """Three reads asked for in one turn, two with the same key (which tells their rows
    apart): those two do not go in the same round trip, and each reads its own row."""
    rows = await asyncio.gather(
        transactor.run_together("a", echo, "k", 1),
        transactor.run_together("a", echo, "k", 2),
        transactor.run_together("b", echo, "j", 3),
    )
    assert list(rows) == [[("k", 1)], [("k", 2)], [("j", 3)]]


def counted(made: list[str], key: str, keyed: bool) -> Steps[list[tuple[Any, ...]]]:
    """A read that notes each time its steps are made."""
    made.append(key)
    text = "SELECT CAST(:key AS TEXT)" if keyed else "SELECT CAST(:key AS TEXT) AS unkeyed"
    return (yield Sql(text, {"key": key}, alone=True, keyed_by="key" if keyed else ""))


async def test_a_transaction_not_sent_with_others_is_made_once(
    transactor: PostgresTransactor,
) -> None:
    """Three transactions asked for in one turn, none sent with another (two statements
    alone of their kind, one not keyed): each runs on from the first statement taken to
    group them, and its steps are made once."""
    made: list[str] = []
    rows = await asyncio.gather(
        transactor.run_together("1", counted, made, "a", True),
        transactor.run_together("2", counted, made, "b", False),
        transactor.run_together("3", echo, "k", 3),
    )
    assert list(rows) == [[("a",)], [("b",)], [("k", 3)]]
    assert made == ["a", "b"]


async def test_an_opening_cancelled_before_its_turn_ends_sends_nothing(
    dsn: str, transactor: PostgresTransactor
) -> None:
    """Of three openings asked for in one turn, one is cancelled before the turn ends:
    it is not sent (its message is not saved, its user holds nothing); the others are."""
    users = [f"u{n}{uuid.uuid4().hex[:8]}" for n in range(3)]
    rules = replace(RULES, writable_ctes=True)
    async with connections(dsn, 1) as (monitor,):
        await add_users(monitor, *users)
        asked = [(user, await new_chat(monitor, user), new_id()) for user in users]
        tasks = [
            asyncio.ensure_future(
                transactor.run_together(user, open_steps, rules, user, chat, "hi", None, said)
            )
            for user, chat, said in asked
        ]
        await asyncio.sleep(0)  # each has asked; the turn has not ended
        tasks[1].cancel()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(outcomes[1], asyncio.CancelledError)
        assert isinstance(outcomes[0], Opened) and isinstance(outcomes[2], Opened)
        saved = await monitor.fetch(
            "SELECT message_id FROM messages WHERE message_id = ANY($1::uuid[])",
            [said for *_, said in asked],
        )
        assert sorted(row[0] for row in saved) == sorted([asked[0][2], asked[2][2]])
        assert await reserved_balance(monitor, users[1]) == (0, 0)


def broken_steps() -> Steps[None]:
    """A transaction that fails before its first statement (a bug in its steps)."""
    raise ValueError("a bug before the first statement")
    yield Sql("SELECT 1", {})  # a generator all the same


async def test_steps_that_fail_before_their_statement_fail_alone(
    dsn: str, transactor: PostgresTransactor
) -> None:
    """A transaction whose steps raise before their first statement, asked for with a
    settlement in one turn: it hears its own error, and the settlement is written (no
    caller is left waiting)."""
    user = f"u{uuid.uuid4().hex[:8]}"
    async with connections(dsn, 1) as (monitor,):
        await add_users(monitor, user)
        chat = await new_chat(monitor, user)
        opening = await transactor.run(open_steps, RULES, user, chat, "hi", None, new_id())
        s = settlement_of(opening, user, chat)
        outcomes = await asyncio.wait_for(
            asyncio.gather(
                transactor.run_together("a", broken_steps),
                settle(transactor, s),
                return_exceptions=True,
            ),
            timeout=30,
        )
        assert isinstance(outcomes[0], ValueError) and outcomes[1] is None
        billed = await monitor.fetchval(
            "SELECT count(*) FROM usage_events WHERE message_id = $1", s.message_id
        )
        assert billed == 1


@contextlib.asynccontextmanager
async def losing_the_answer_to(dsn: str, marker: bytes) -> AsyncIterator[PostgresTransactor]:
    """A transactor whose first statement containing `marker` runs on the server and
    whose answer is lost on the way back (`LostAnswerProxy`)."""
    parts = urlsplit(dsn)
    proxy = LostAnswerProxy(parts.hostname or "127.0.0.1", parts.port or 5432, marker)
    await proxy.start()
    netloc = f"{parts.username}@127.0.0.1:{proxy.port}"
    running = PostgresTransactor(urlunsplit(parts._replace(netloc=netloc)), pool_size=4)
    try:
        yield running
        assert proxy.lost == 1
    finally:
        await running.close()
        await proxy.close()


async def test_openings_sent_together_whose_answer_is_lost_are_each_taken_back(
    dsn: str,
) -> None:
    """The connection is lost as the answer to three openings sent together comes back:
    each hears `ConnectionLost` (it may have been written), all or none was written (one
    transaction), and each is taken back as the message path does (`undo_opening`),
    which leaves nothing held."""
    users = [f"u{n}{uuid.uuid4().hex[:8]}" for n in range(3)]
    lost = losing_the_answer_to(dsn, b"held AS (INSERT INTO reservations")
    async with connections(dsn, 1) as (monitor,), lost as transactor:
        await add_users(monitor, *users)
        asked = [(user, await new_chat(monitor, user), new_id()) for user in users]
        outcomes = await open_together(transactor, asked)
        assert [type(outcome) for outcome in outcomes] == [ConnectionLost] * 3
        undone = [
            await transactor.run(undo_opening, user, chat, said, RULES.worker_id, RULES.plans)
            for user, chat, said in asked
        ]
        assert undone in ([True] * 3, [False] * 3)
        for user, chat, _ in asked:
            assert await reserved_balance(monitor, user) == (0, 0)
            kept = await monitor.fetchval("SELECT count(*) FROM messages WHERE chat_id = $1", chat)
            assert kept == 0


async def test_settlements_sent_together_whose_answer_is_lost_are_billed_once(
    dsn: str, transactor: PostgresTransactor
) -> None:
    """The connection is lost as the answer to three settlements sent together comes
    back: each hears `ConnectionLost`, and each one's retry (`is_retry`, as
    `settle_with_retries` makes it) finds whether it was written: every reply is
    billed exactly once."""
    users = [f"u{n}{uuid.uuid4().hex[:8]}" for n in range(3)]
    async with connections(dsn, 1) as (monitor,):
        await add_users(monitor, *users)
        settlements = []
        for user in users:
            chat = await new_chat(monitor, user)
            opening = await transactor.run(open_steps, RULES, user, chat, "hi", None, new_id())
            settlements.append(settlement_of(opening, user, chat))
        async with losing_the_answer_to(dsn, b"gone AS (DELETE FROM reservations") as losing:
            outcomes = await asyncio.gather(
                *(settle(losing, s) for s in settlements), return_exceptions=True
            )
            assert [type(outcome) for outcome in outcomes] == [ConnectionLost] * 3
            for s in settlements:
                await settle(losing, s, is_retry=True)
        for s in settlements:
            row = await monitor.fetchrow(
                "SELECT total_tokens_used, reserved_tokens FROM user_usage WHERE user_id = $1",
                s.user_id,
            )
            billed = await monitor.fetchval(
                "SELECT count(*) FROM usage_events WHERE message_id = $1", s.message_id
            )
            assert (tuple(row), billed) == ((s.usage.total_tokens, 0), 1)
