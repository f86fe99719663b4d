"""PostgreSQL: a reservation that first meets a limit reads the user's row and asks
again for what fits (`budget._reserve`). Other openings of the same user, committing
between that read and the take, made every take miss: after three misses the request
was refused with 403 TOKEN_BUDGET_EXCEEDED (and no `resets_at`), even when the user had
room left, or when the concurrent replies were full (429 RATE_LIMITED by SPEC 10)."""

from __future__ import annotations

import asyncio
from datetime import datetime
from decimal import Decimal

import asyncpg

from chatmeter.config import PlanConfig
from chatmeter.db.steps import PostgresStatements, Steps, run_asyncpg
from chatmeter.db.tables import utcnow
from chatmeter.metering.budget import Amounts, Ask, reserve_budget, take_statement
from chatmeter.metering.plans import PlanBook
from chatmeter.metering.reservations import Reservation
from tests.conftest import make_settings
from tests.support.waiting import eventually

BOOK = PlanBook.of(
    make_settings(
        "sqlite+aiosqlite://",
        plans={"four": PlanConfig(token_limit=1000, period="day", concurrent_replies=4)},
        default_plan="four",
    )
)
USER = "contended"


def another_opening(now: datetime) -> Steps[None]:
    """What a concurrent opening of the same user takes: 2 tokens, one reply."""
    yield take_statement(BOOK, USER, Amounts.of(2, 0), now)


async def test_openings_committing_between_the_read_and_the_take_do_not_refuse_it(
    conns: list[asyncpg.Connection],
) -> None:
    ours, theirs, watcher = conns
    now = utcnow()
    start = BOOK.period_start_at("four", now)
    await ours.execute(
        "INSERT INTO user_usage (user_id, total_tokens_used, token_limit, reserved_tokens, "
        "updated_at, plan, token_limit_overridden, period_start, spend_micros, "
        "reserved_micros, active_replies, rate_tat) VALUES ($1, 950, 1000, 0, $2, 'four', "
        "false, $3, 0, 0, 1, 0)",
        USER,
        now,
        start,
    )
    # 50 tokens left: the 120 asked for do not fit, the read finds 50 that do
    ask = Ask(USER, None, 20, 100, BOOK, Decimal(0), "w", 600, now)
    others: list[asyncio.Task[None]] = []
    statements = PostgresStatements()
    their_pid = theirs.get_server_pid()

    async def drive() -> Reservation:
        steps = reserve_budget(ask)
        async with ours.transaction():
            statement = next(steps)
            while True:
                text, args = statements.convert(statement)
                rows = [tuple(r) for r in await ours.fetch(text, *args)]
                if statement.text.startswith(f"SELECT {BOOK.standing_columns}"):
                    # another opening of the user's between our read and our take: it
                    # commits, or waits for a lock our transaction holds
                    other = asyncio.create_task(
                        run_asyncpg(theirs, PostgresStatements(), another_opening(now))
                    )
                    others.append(other)

                    async def ended_or_waits(task: asyncio.Task[object] = other) -> bool:
                        return task.done() or await _waits(watcher, their_pid)

                    await eventually(ended_or_waits, 20)
                    if other.done():
                        other.result()
                try:
                    statement = steps.send(rows)
                except StopIteration as done:
                    reservation: Reservation = done.value
                    return reservation

    reservation = await drive()
    for other in others:
        await asyncio.wait_for(other, 20)
    assert reservation.tokens == 50
    row = await ours.fetchrow(
        "SELECT reserved_tokens, active_replies FROM user_usage WHERE user_id = $1", USER
    )
    # ours holds the 50 tokens the read found; the other opening, which waited for it,
    # then found none left and took nothing
    assert tuple(row) == (50, 2)


async def _waits(watcher: asyncpg.Connection, pid: int) -> bool:
    waiting = await watcher.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND wait_event_type = 'Lock'", pid
    )
    return bool(waiting)
