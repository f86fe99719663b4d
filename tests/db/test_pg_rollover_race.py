"""PostgreSQL: the reservation that rolls a user's period over (`budget.roll_over`) sums
the ledger after it holds the user's row, in a statement of its own. Summed inside the
statement that waited for the row, under the snapshot it took before waiting, the sums
missed a settlement that committed meanwhile, and the totals stayed short of the
ledger for the rest of the period (SPEC section 10)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import asyncpg

from chatmeter.config import PlanConfig
from chatmeter.db.steps import PostgresStatements, run_asyncpg
from chatmeter.metering.budget import Ask, reserve_budget
from chatmeter.metering.periods import to_micros
from chatmeter.metering.plans import PlanBook
from tests.conftest import make_settings
from tests.support.waiting import eventually

# restarted with the default plan's period a day instead of a month
DAILY = PlanBook.of(
    make_settings(
        "sqlite+aiosqlite://",
        plans={"shifting": PlanConfig(token_limit=100_000, period="day")},
        default_plan="shifting",
    )
)
USER = "racing"
NOW = datetime(2026, 12, 15, 12, tzinfo=UTC)
MONTH = datetime(2026, 12, 1, tzinfo=UTC)
DAY = datetime(2026, 12, 15, tzinfo=UTC)


async def spend(conn: asyncpg.Connection, at: datetime, tokens: int) -> None:
    """A settlement of the user's: its ledger row, and the totals of the row's period."""
    await conn.execute(
        "INSERT INTO usage_events (event_id, user_id, chat_id, message_id, model, "
        "prompt_tokens, completion_tokens, thinking_tokens, cached_tokens, total_tokens, "
        "source, created_at, cost_micros) VALUES ($1, $2, NULL, $3, 'm', $4, 0, 0, 0, $4, "
        "'provider', $5, $4)",
        uuid.uuid4(),
        USER,
        uuid.uuid4(),
        tokens,
        at,
    )
    await conn.execute(
        "UPDATE user_usage SET total_tokens_used = total_tokens_used + $2, "
        "spend_micros = spend_micros + $2 WHERE user_id = $1",
        USER,
        tokens,
    )


async def test_a_rollover_counts_a_settlement_that_committed_while_it_waited(
    conns: list[Any],
) -> None:
    ours, theirs, watcher = conns
    await ours.execute(
        "INSERT INTO user_usage (user_id, total_tokens_used, token_limit, reserved_tokens, "
        "updated_at, plan, token_limit_overridden, period_start, spend_micros, "
        "reserved_micros, active_replies, rate_tat) VALUES ($1, 0, 100000, 0, $2, '', "
        "false, $3, 0, 0, 0, 0)",
        USER,
        NOW,
        to_micros(MONTH),
    )
    await spend(ours, datetime(2026, 12, 3, tzinfo=UTC), 400)  # the month's, not the day's
    await spend(ours, datetime(2026, 12, 15, 8, tzinfo=UTC), 300)
    # a settlement of the user's holds the row, and commits while our reservation waits
    settling = theirs.transaction()
    await settling.start()
    await spend(theirs, datetime(2026, 12, 15, 11, 59, tzinfo=UTC), 200)
    ask = Ask(USER, None, 20, 100, DAILY, Decimal(0), "w", 600, NOW)
    reserving = asyncio.create_task(run_asyncpg(ours, PostgresStatements(), reserve_budget(ask)))
    our_pid = ours.get_server_pid()

    async def waits() -> bool:
        count = await watcher.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND wait_event_type = 'Lock'",
            our_pid,
        )
        return bool(count)

    await eventually(waits, 20)
    await settling.commit()
    reservation = await asyncio.wait_for(reserving, 20)
    assert reservation.tokens == 120
    row = await watcher.fetchrow(
        "SELECT total_tokens_used, spend_micros, period_start, reserved_tokens "
        "FROM user_usage WHERE user_id = $1",
        USER,
    )
    assert tuple(row) == (500, 500, to_micros(DAY), 120), "the day's ledger, both settlements"
