"""The usage steps (`metering/accounts.py`, `metering/summary.py`) through the
transactor, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from chatmeter.config import PlanConfig
from chatmeter.db.steps import Sql, Steps
from chatmeter.db.tables import usage_events
from chatmeter.db.transactor import Transactor
from chatmeter.ids import new_id
from chatmeter.metering import accounts
from chatmeter.metering.plans import PlanBook
from chatmeter.metering.summary import DayRange, summarize
from tests.conftest import make_settings

NEW_YORK = "America/New_York"


def book(database_url: str) -> PlanBook:
    plans = {"daily": PlanConfig(token_limit=50_000, period="day")}
    return PlanBook.of(make_settings(database_url, plans=plans, timezone=NEW_YORK))


async def spent(
    engine: AsyncEngine, user_id: str, at: datetime, tokens: int, model: str = "m"
) -> None:
    """A ledger row, written as the settlement writes it."""
    async with engine.begin() as conn:
        await conn.execute(
            usage_events.insert().values(
                event_id=new_id(),
                user_id=user_id,
                chat_id=None,
                message_id=new_id(),
                model=model,
                prompt_tokens=tokens,
                completion_tokens=0,
                thinking_tokens=0,
                cached_tokens=0,
                total_tokens=tokens,
                source="provider",
                created_at=at,
                cost_micros=tokens * 10,
            )
        )


async def test_a_user_is_created_on_the_default_plan_when_first_seen(
    transactor: Transactor, database_url: str
) -> None:
    plans = book(database_url)
    row = await transactor.run(accounts.usage_steps, "newcomer", plans)
    assert row == await transactor.run(accounts.usage_steps, "newcomer", plans)  # once
    usage = accounts.usage_json(row, plans)
    assert usage["user_id"] == "newcomer" and usage["plan"] == plans.default
    assert usage["total_tokens_used"] == usage["reserved_tokens"] == 0
    limited = accounts.usage_json(
        await transactor.run(accounts.set_limit, "stranger", 77, plans), plans
    )
    assert limited["token_limit"] == 77 and limited["tokens_remaining"] == 77


def previous_take(user_id: str) -> Steps[list[tuple[Any, ...]]]:
    """What the reserve statement of the release before 0005 returned: the row's plan as
    it is stored (`RETURNING plan`)."""
    rows = yield Sql(
        "UPDATE user_usage SET reserved_tokens = reserved_tokens WHERE user_id = :user_id "
        "RETURNING plan",
        {"user_id": user_id},
    )
    return rows


async def test_a_user_no_admin_assigned_is_on_the_default_for_the_release_before_too(
    transactor: Transactor, database_url: str
) -> None:
    """A rolling upgrade (README: `chatmeter db upgrade` once, then the replicas one by
    one) runs the release before on the migrated schema. Its one-statement opening on
    PostgreSQL reads a NULL plan as a refused reservation, though the statement had
    committed it with the user message: it then answered 409 for the chat it held
    itself. An unassigned user's plan is a name no plan has, which that release reads
    as the default, as it reads a plan no longer configured."""
    plans = book(database_url)
    row = await transactor.run(accounts.usage_steps, "unassigned", plans)
    [(stored,)] = await transactor.run(previous_take, "unassigned")
    assert stored is not None and stored not in plans.plans
    assert plans.plan(stored) == plans.plans[plans.default]
    assert accounts.usage_json(row, plans)["plan"] == plans.default


async def test_a_plan_with_a_period_takes_the_ledger_sums_of_its_current_period(
    transactor: Transactor, audit_engine: AsyncEngine, database_url: str
) -> None:
    plans = book(database_url)
    now = datetime.now(UTC)
    current = plans.current("day", now)
    assert current is not None
    await spent(audit_engine, "pat", current.start.replace(year=2020), 1000)  # long ago
    await spent(audit_engine, "pat", current.start, 30)
    await spent(audit_engine, "pat", now, 12)
    usage = accounts.usage_json(
        await transactor.run(accounts.set_plan, "pat", "daily", plans), plans
    )
    assert usage["plan"] == "daily" and usage["token_limit"] == 50_000
    assert usage["total_tokens_used"] == 42 and usage["spend_micros"] == 420


async def test_user_search_takes_like_wildcards_and_the_escape_literally(
    transactor: Transactor, database_url: str
) -> None:
    plans = book(database_url)
    names = ["a%b", "a_b", "a/b", "A/B2", "axb", "a\\b"]
    for name in names:
        await transactor.run(accounts.usage_steps, name, plans)

    async def found(part: str) -> list[str]:
        total, rows = await transactor.run(accounts.find_users, part, 50, 0, plans)
        assert total == len(rows)
        return [row[0] for row in rows]

    assert await found("%") == ["a%b"]
    assert await found("_") == ["a_b"]
    assert await found("/") == ["A/B2", "a/b"]
    assert await found("a/b") == ["A/B2", "a/b"]  # any case
    assert await found("\\") == ["a\\b"]
    assert await found("") == sorted(names)
    total, page = await transactor.run(accounts.find_users, "", 2, 1, plans)
    assert total == len(names) and [row[0] for row in page] == sorted(names)[1:3]


async def test_days_are_local_days_across_a_dst_change(
    transactor: Transactor, audit_engine: AsyncEngine, database_url: str
) -> None:
    zone = book(database_url).zone
    # New York moves to EDT at 2026-03-08 02:00: that day is 23 hours long
    moments = {
        datetime(2026, 3, 7, 4, 59, tzinfo=UTC): 1,  # 23:59 EST on the 6th: before the range
        datetime(2026, 3, 8, 4, 59, tzinfo=UTC): 2,  # 23:59 EST on the 7th
        datetime(2026, 3, 8, 5, 0, tzinfo=UTC): 4,  # midnight EST: the 8th
        datetime(2026, 3, 9, 3, 59, 59, tzinfo=UTC): 8,  # 23:59:59 EDT on the 8th
        datetime(2026, 3, 9, 4, 0, tzinfo=UTC): 16,  # midnight EDT: the 9th
        datetime(2026, 3, 10, 4, 0, tzinfo=UTC): 32,  # the 10th: after the range
    }
    for at, tokens in moments.items():
        await spent(audit_engine, "ned", at, tokens, model=f"m{tokens % 3}")
    await spent(audit_engine, "other", datetime(2026, 3, 8, 12, tzinfo=UTC), 64)
    days = DayRange(date(2026, 3, 7), date(2026, 3, 9))
    sqlite = database_url.startswith("sqlite")

    by_day = await transactor.run(summarize, days, zone, "day", "ned", sqlite)
    assert [(r["day"], r["requests"], r["total_tokens"]) for r in by_day] == [
        ("2026-03-07", 1, 2),
        ("2026-03-08", 2, 12),
        ("2026-03-09", 1, 16),
    ]
    assert by_day[1]["cost_micros"] == 120 and by_day[1]["prompt_tokens"] == 12
    everyone = await transactor.run(summarize, days, zone, "user", None, sqlite)
    assert [(r["user"], r["total_tokens"]) for r in everyone] == [("ned", 30), ("other", 64)]
    by_model = await transactor.run(summarize, days, zone, "model", "ned", sqlite)
    assert [(r["model"], r["total_tokens"]) for r in by_model] == [("m1", 20), ("m2", 10)]
