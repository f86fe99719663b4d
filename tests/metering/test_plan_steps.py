"""The reserve and settle statements across period boundaries (SPEC section 10), driven
at chosen instants on SQLite and PostgreSQL: the rollover happens inside them, with no
job, across DST changes and month lengths, with reservations in flight carried over."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from chatmeter.config import PlanConfig
from chatmeter.db.engine import make_engine
from chatmeter.db.tables import chats, messages, user_usage, utcnow
from chatmeter.db.transactor import Transactor, make_transactor
from chatmeter.errors import ApiError
from chatmeter.ids import new_id
from chatmeter.metering import accounts
from chatmeter.metering.budget import (
    ASKED,
    Amounts,
    Ask,
    at_once_ctes,
    reserve_budget,
    take_statement,
)
from chatmeter.metering.cost import Prices, cost_micros
from chatmeter.metering.periods import to_micros
from chatmeter.metering.plans import PlanBook
from chatmeter.metering.reservations import Reservation, release_expired
from chatmeter.metering.settlement import Settlement, settle_steps
from chatmeter.providers.base import Usage
from chatmeter.streaming.opening import ModelLimits, OpeningRules, open_steps
from tests.conftest import make_settings
from tests.metering.test_accounts_steps import spent
from tests.support.db import balanced, open_reservations, period_books

PRICES = Prices(Decimal("0.5"), Decimal("0.5"), Decimal("1.5"), Decimal("1.5"))
PLANS = {
    "daily": PlanConfig(token_limit=100_000, spend_limit=Decimal("0.02"), period="day"),
    "monthly": PlanConfig(token_limit=10_000, period="month"),
    "minute": PlanConfig(token_limit=10_000, period="1m"),
    # a fixed length longer than the time since 1970: its one period starts at the epoch
    "forever": PlanConfig(token_limit=10_000, period="100000d"),
}


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


class Books:
    def __init__(
        self, engine: AsyncEngine, transactor: Transactor, book: PlanBook, url: str
    ) -> None:
        self.engine = engine
        self.transactor = transactor
        self.book = book
        self.url = url

    async def user(self, user_id: str, plan: str) -> uuid.UUID:
        chat_id = new_id()
        async with self.engine.begin() as conn:
            await conn.execute(
                sa.insert(user_usage).values(
                    user_id=user_id,
                    total_tokens_used=0,
                    token_limit=10_000,
                    reserved_tokens=0,
                    updated_at=utc(2026, 1, 1),
                    plan=plan,
                )
            )
            await conn.execute(
                sa.insert(chats).values(
                    chat_id=chat_id,
                    user_id=user_id,
                    title="t",
                    model="m",
                    is_active=True,
                    created_at=utc(2026, 1, 1),
                    updated_at=utc(2026, 1, 1),
                )
            )
        return chat_id

    async def reserve(self, user_id: str, at: datetime, output: int = 100) -> Reservation:
        ask = Ask(
            user_id,
            new_id(),  # a chat of its own: several may be in flight
            20,
            output,
            self.book,
            PRICES.highest,
            "test",
            600,
            at,
        )
        reservation: Reservation = await self.transactor.run(reserve_budget, ask)
        return reservation

    async def settle(
        self, chat_id: uuid.UUID, r: Reservation, at: datetime, usage: Usage
    ) -> Settlement:
        settlement = Settlement(
            user_id=r.user_id,
            chat_id=chat_id,
            model="m",
            reservation_id=r.reservation_id,
            message_id=new_id(),
            content="reply",
            status="complete",
            finish_reason="stop",
            usage=usage,
            source="provider",
            created_at=at,
            cost_micros=cost_micros(usage, PRICES),
        )
        await self.transactor.run(
            settle_steps, settlement, writable_ctes=self.transactor.writable_ctes
        )
        return settlement

    async def shown(self, user_id: str, at: datetime) -> tuple[int, int]:
        """The user's totals as the API shows them at `at`: tokens, money."""
        row = await self.transactor.run(accounts.usage_steps, user_id, self.book, at)
        usage = accounts.usage_json(row, self.book, at)
        return usage["total_tokens_used"], usage["spend_micros"]

    async def exchange(self, user_id: str, chat_id: uuid.UUID, at: datetime, usage: Usage) -> None:
        reservation = await self.reserve(user_id, at)
        await self.settle(chat_id, reservation, at + timedelta(milliseconds=1), usage)


@pytest.fixture
async def ledger(database_url: str) -> AsyncIterator[Books]:
    settings = make_settings(database_url, plans=PLANS, timezone="America/New_York")
    engine = make_engine(database_url)
    transactor = make_transactor(database_url, 30_000)
    await transactor.start()
    try:
        yield Books(engine, transactor, PlanBook.of(settings), database_url)
    finally:
        await transactor.close()
        await engine.dispose()


async def test_days_roll_over_at_local_midnight_across_a_dst_change(ledger: Books) -> None:
    chat = await ledger.user("dora", "daily")
    # 23:30 on Saturday 7 March in New York (EST, UTC-5)
    await ledger.exchange("dora", chat, utc(2026, 3, 8, 4, 30), Usage(60, 40))
    state = await period_books(ledger.engine, "dora")
    assert (state.total, state.spend) == (100, 90) and balanced(state)
    assert state.period_start == to_micros(utc(2026, 3, 7, 5))
    # 00:30 on Sunday 8 March: a new day, the statement itself starts it again
    await ledger.exchange("dora", chat, utc(2026, 3, 8, 5, 30), Usage(10, 20))
    state = await period_books(ledger.engine, "dora")
    assert (state.total, state.spend) == (30, 35) and balanced(state)
    assert state.period_start == to_micros(utc(2026, 3, 8, 5))
    # 23:30 EDT on the 23-hour Sunday: still the same day
    await ledger.exchange("dora", chat, utc(2026, 3, 9, 3, 30), Usage(1, 1))
    state = await period_books(ledger.engine, "dora")
    assert state.total == 32 and balanced(state)
    # 00:10 EDT on Monday: 4:10 UTC, an hour earlier in UTC than the day before
    await ledger.exchange("dora", chat, utc(2026, 3, 9, 4, 10), Usage(3, 4))
    state = await period_books(ledger.engine, "dora")
    assert state.total == 7 and balanced(state)
    assert state.period_start == to_micros(utc(2026, 3, 9, 4))
    assert (state.reserved, state.reserved_micros, state.active) == (0, 0, 0)


async def test_months_roll_over_from_31_january_to_1_march(ledger: Books) -> None:
    chat = await ledger.user("mona", "monthly")
    # 31 January, 23:00 in New York
    await ledger.exchange("mona", chat, utc(2026, 2, 1, 4), Usage(500, 500))
    state = await period_books(ledger.engine, "mona")
    assert state.total == 1000 and balanced(state)
    # nothing in February; the next exchange is on 1 March, 00:00:01 local
    await ledger.exchange("mona", chat, utc(2026, 3, 1, 5, 0, 1), Usage(7, 3))
    state = await period_books(ledger.engine, "mona")
    assert state.total == 10 and balanced(state)
    assert state.period_start == to_micros(utc(2026, 3, 1, 5))


async def test_a_boundary_crossed_while_replies_stream(ledger: Books) -> None:
    chat = await ledger.user("bea", "monthly")
    await ledger.exchange("bea", chat, utc(2026, 1, 20), Usage(900, 100))
    # two replies open just before the month ends, and stream across its end
    eve = utc(2026, 2, 1, 4, 59, 59)  # 31 January, 23:59:59 EST
    first = await ledger.reserve("bea", eve)
    second = await ledger.reserve("bea", eve)
    state = await period_books(ledger.engine, "bea")
    assert state.total == 1000 and state.reserved == 240 and state.active == 2
    # the first settles in February: it counts there, January's usage is gone (the row
    # keeps January's period, with this exchange in it, until the next reservation
    # starts February's; what it shows is February's)
    february = utc(2026, 2, 1, 5, 0, 1)
    await ledger.settle(chat, first, february, Usage(50, 50))
    state = await period_books(ledger.engine, "bea")
    assert (await ledger.shown("bea", february))[0] == 100 and balanced(state)
    assert state.reserved == 120 and state.active == 1, "the reservation in flight carries over"
    await ledger.settle(chat, second, utc(2026, 2, 1, 5, 0, 2), Usage(20, 30))
    state = await period_books(ledger.engine, "bea")
    assert (await ledger.shown("bea", february))[0] == 150 and balanced(state)
    assert (state.reserved, state.reserved_micros, state.active) == (0, 0, 0)
    # the next reservation starts February's period: its totals are the two exchanges
    await ledger.reserve("bea", utc(2026, 2, 1, 6))
    state = await period_books(ledger.engine, "bea")
    assert (state.total, state.period_start) == (150, to_micros(utc(2026, 2, 1, 5)))
    assert balanced(state)


async def test_a_settlement_replayed_after_its_period_ended_stays_in_it(ledger: Books) -> None:
    chat = await ledger.user("otto", "minute")
    start = utc(2026, 4, 1, 12)
    late = await ledger.reserve("otto", start)
    # the next minute's exchanges settle first; the late one (a spooled settlement,
    # replayed) was made in the minute before
    await ledger.exchange("otto", chat, start + timedelta(seconds=61), Usage(10, 10))
    await ledger.settle(chat, late, start + timedelta(seconds=30), Usage(5, 5))
    state = await period_books(ledger.engine, "otto")
    assert state.total == 20 and balanced(state)
    assert (state.reserved, state.active) == (0, 0)


async def test_one_conditional_update_cannot_reset_twice(ledger: Books) -> None:
    chat = await ledger.user("rex", "minute")
    start = utc(2026, 4, 1, 12)
    await ledger.exchange("rex", chat, start, Usage(100, 100))
    boundary = start + timedelta(minutes=1)
    # the first statement of the new minute rolls over and settles; statements of the
    # same minute (another worker, the same instant) find it rolled and keep its usage
    await ledger.exchange("rex", chat, boundary, Usage(3, 3))
    for _ in range(3):
        await ledger.exchange("rex", chat, boundary, Usage(1, 1))
    state = await period_books(ledger.engine, "rex")
    assert state.total == 12 and balanced(state)


async def test_spend_limit_holds_and_resets_with_the_period(ledger: Books) -> None:
    chat = await ledger.user("sam", "daily")
    noon = utc(2026, 6, 1, 16)  # 12:00 EDT
    # 0.02 = 20,000 micro-units; 2,000 output tokens at 1.5 = 3,000 micro-units
    usage = Usage(2000, 2000)  # 1,000 + 3,000 = 4,000 micro-units
    for _ in range(4):
        await ledger.exchange("sam", chat, noon, usage)
    state = await period_books(ledger.engine, "sam")
    assert state.spend == 16_000 and balanced(state)
    # 4,000 left buys 2,666 tokens at the highest price: the output cap is lowered
    lowered = await ledger.reserve("sam", noon, output=5000)
    assert lowered.tokens == 2666 and lowered.micros <= 4000
    with pytest.raises(ApiError) as refused:
        await ledger.reserve("sam", noon)
    assert refused.value.code == "SPEND_LIMIT_EXCEEDED"
    assert refused.value.extra["resets_at"] == "2026-06-02T04:00:00+00:00"
    # the next day the money is there again
    await ledger.settle(chat, lowered, utc(2026, 6, 2, 4, 0, 1), Usage(20, 10))
    assert (await ledger.shown("sam", utc(2026, 6, 2, 4, 0, 1)))[1] == 25
    assert balanced(await period_books(ledger.engine, "sam"))
    assert (await ledger.reserve("sam", utc(2026, 6, 2, 5))).tokens == 120
    state = await period_books(ledger.engine, "sam")
    assert state.spend == 25 and balanced(state)


async def test_a_settlement_whose_reservation_the_sweeper_released_hands_back_nothing_twice(
    ledger: Books,
) -> None:
    # the worker stalled past its lease: the sweeper released the reservation, and the
    # settlement that comes late bills the exchange without releasing it again
    chat = await ledger.user("lena", "daily")
    at = utc(2026, 5, 4, 12)
    reservation = await ledger.reserve("lena", at)
    held = await period_books(ledger.engine, "lena")
    assert (held.reserved, held.active) == (120, 1)
    assert await ledger.transactor.run(release_expired, at + timedelta(seconds=601)) == 1
    await ledger.settle(chat, reservation, at + timedelta(seconds=602), Usage(30, 20))
    state = await period_books(ledger.engine, "lena")
    assert (state.reserved, state.reserved_micros, state.active) == (0, 0, 0)
    assert state.total == 50 and balanced(state)


async def test_a_plan_assigned_while_a_reply_streams_keeps_the_new_plans_period(
    ledger: Books,
) -> None:
    # the reply opens on a plan of one-minute periods; while it streams the admin moves
    # the user to a plan whose period began long ago, and its totals become the ledger's
    # sums since then. The settlement counts in the period of the plan the user is on
    # when it settles (SPEC section 10), not in the minute of the plan it opened on,
    # which would start the totals again from this one exchange
    chat = await ledger.user("paul", "minute")
    now = utcnow()
    reservation = await ledger.reserve("paul", now)
    await spent(ledger.engine, "paul", utc(2020, 1, 1), 1000)
    await ledger.transactor.run(accounts.set_plan, "paul", "forever", ledger.book)
    state = await period_books(ledger.engine, "paul")
    assert (state.total, state.period_start) == (1000, 0) and balanced(state)
    await ledger.settle(chat, reservation, now + timedelta(milliseconds=1), Usage(30, 20))
    state = await period_books(ledger.engine, "paul")
    assert (state.total, state.period_start) == (1050, 0) and balanced(state)
    assert (state.reserved, state.reserved_micros, state.active) == (0, 0, 0)
    # and the budget the next reservation sees is the plan's, less all of it
    standing = await ledger.transactor.run(accounts.usage_steps, "paul", ledger.book)
    assert accounts.usage_json(standing, ledger.book)["tokens_remaining"] == 10_000 - 1050


async def test_a_reply_settling_after_its_old_plans_period_ended_on_a_plan_without_one(
    ledger: Books,
) -> None:
    # moved to a plan without a period while a reply streams, the user's totals go on
    # from where they are; the reply settles in the next minute, which would have
    # started the old plan's totals again, and must not start the new plan's
    chat = await ledger.user("nell", "minute")
    start = utc(2026, 4, 1, 12)
    await ledger.exchange("nell", chat, start + timedelta(seconds=10), Usage(100, 100))
    reservation = await ledger.reserve("nell", start + timedelta(seconds=50))
    moved = start + timedelta(seconds=55)
    await ledger.transactor.run(accounts.set_plan, "nell", "default", ledger.book, moved)
    await ledger.settle(chat, reservation, start + timedelta(seconds=70), Usage(5, 5))
    state = await period_books(ledger.engine, "nell")
    assert state.total == 210, "a plan without a period never starts the totals again"
    assert state.period_start == to_micros(start) and balanced(state)
    assert (state.reserved, state.active) == (0, 0)


async def test_a_plan_without_a_period_goes_on_from_totals_already_started_again(
    ledger: Books,
) -> None:
    # the user's minute ended with no statement since to roll the row over: the API
    # shows 0 used. Moved to a plan without a period, the user goes on from that 0, not
    # from the ended minute's totals the row still holds (a period resets at its
    # boundary whether or not anything ran then, SPEC section 10)
    chat = await ledger.user("ivy", "minute")
    ended = utcnow() - timedelta(minutes=2)
    await ledger.exchange("ivy", chat, ended, Usage(100, 100))
    before = await ledger.transactor.run(accounts.usage_steps, "ivy", ledger.book)
    assert accounts.usage_json(before, ledger.book)["total_tokens_used"] == 0
    after = await ledger.transactor.run(accounts.set_plan, "ivy", "default", ledger.book)
    shown = accounts.usage_json(after, ledger.book)
    assert (shown["total_tokens_used"], shown["spend_micros"]) == (0, 0)
    state = await period_books(ledger.engine, "ivy")
    assert state.total == 0 and balanced(state)


async def test_a_refused_opening_writes_nothing(ledger: Books) -> None:
    # on PostgreSQL the opening's common case is one statement: refused, it must leave
    # neither a reservation nor the user message nor a change to the user's row
    chat = await ledger.user("rita", "minute")
    rules = OpeningRules(
        models={"m": ModelLimits("be brief", 100_000, 500, PRICES.highest)},
        history_messages=10,
        plans=ledger.book,
        worker_id="test",
        reservation_ttl_seconds=600,
        writable_ctes=ledger.transactor.writable_ctes,
    )
    before = await period_books(ledger.engine, "rita")
    message_id = new_id()
    too_long = "x" * 12_000  # more tokens than the plan's 10,000, as the prompt alone
    with pytest.raises(ApiError) as refused:
        await ledger.transactor.run(open_steps, rules, "rita", chat, too_long, None, message_id)
    assert refused.value.code == "TOKEN_BUDGET_EXCEEDED"
    assert await period_books(ledger.engine, "rita") == before
    assert await open_reservations(ledger.engine, "rita") == 0
    assert await message_ids(ledger.engine, chat) == []
    # within the limit it opens, and a second opening of the same chat is a 409 that
    # leaves the first one's reservation and message as they were
    opened = await ledger.transactor.run(open_steps, rules, "rita", chat, "hi", None, message_id)
    assert opened.reservation.output_cap == 500
    with pytest.raises(ApiError) as busy:
        await ledger.transactor.run(open_steps, rules, "rita", chat, "again", None, new_id())
    assert busy.value.code == "REPLY_IN_PROGRESS"
    assert await open_reservations(ledger.engine, "rita") == 1
    assert await message_ids(ledger.engine, chat) == [message_id]
    state = await period_books(ledger.engine, "rita")
    assert (state.reserved, state.active) == (opened.reservation.tokens, 1)


async def message_ids(engine: AsyncEngine, chat_id: uuid.UUID) -> list[uuid.UUID]:
    async with engine.connect() as conn:
        query = sa.select(messages.c.message_id).where(messages.c.chat_id == chat_id)
        return list((await conn.execute(query)).scalars())


# -- a period changed by configuration -------------------------------------------------
#
# A restart with another period for a plan (or another default plan) leaves the rows'
# stored periods as they were; the current period may already hold ledger rows, which
# the totals must count from the first statement on (SPEC section 10: the totals always
# equal the sums of the current period's ledger rows).

MONTHLY = PlanConfig(token_limit=5000, spend_limit=Decimal("1"), period="month")
DAILY = PlanConfig(token_limit=1000, spend_limit=Decimal("1"), period="day")


def restarted(ledger: Books, period: PlanConfig, **settings: object) -> Books:
    """The same database after a restart on which the plan `shifting` has `period`."""
    plans = {**PLANS, "shifting": period}
    book = PlanBook.of(
        make_settings(ledger.url, plans=plans, timezone="America/New_York", **settings)
    )
    return Books(ledger.engine, ledger.transactor, book, ledger.url)


async def test_a_period_shortened_by_configuration_keeps_the_current_days_usage(
    ledger: Books,
) -> None:
    # 1 and 2 December 2026 in New York (EST, UTC-5), on a monthly plan
    monthly = restarted(ledger, MONTHLY)
    chat = await monthly.user("mia", "shifting")
    await monthly.exchange("mia", chat, utc(2026, 12, 1, 17), Usage(30, 10))
    await monthly.exchange("mia", chat, utc(2026, 12, 2, 14), Usage(900, 90))
    state = await period_books(ledger.engine, "mia")
    assert state.total == 1030 and balanced(state)
    # restarted with the plan's period a day: today's 990 tokens are the new period's,
    # shown as such before any statement rolled the row over
    daily = restarted(ledger, DAILY)
    afternoon = utc(2026, 12, 2, 20)
    row = await ledger.transactor.run(accounts.usage_steps, "mia", daily.book, afternoon)
    shown = accounts.usage_json(row, daily.book, afternoon)
    assert (shown["total_tokens_used"], shown["tokens_remaining"]) == (990, 10)
    assert shown["spend_micros"] == cost_micros(Usage(900, 90), PRICES)
    # and the budget holds them: 10 tokens left do not fit a prompt of 20
    with pytest.raises(ApiError) as refused:
        await daily.reserve("mia", afternoon)
    assert refused.value.code == "TOKEN_BUDGET_EXCEEDED"
    assert refused.value.extra["resets_at"] == "2026-12-03T05:00:00+00:00"
    # the next day starts again from 0
    reservation = await daily.reserve("mia", utc(2026, 12, 3, 5, 30))
    assert reservation.tokens == 120
    state = await period_books(ledger.engine, "mia")
    assert (state.total, state.spend) == (0, 0) and balanced(state)
    assert state.period_start == to_micros(utc(2026, 12, 3, 5))


async def test_a_period_lengthened_by_configuration_counts_the_earlier_days(
    ledger: Books,
) -> None:
    daily = restarted(ledger, DAILY)
    chat = await daily.user("max", "shifting")
    await daily.exchange("max", chat, utc(2026, 12, 1, 17), Usage(300, 100))
    await daily.exchange("max", chat, utc(2026, 12, 2, 14), Usage(200, 50))
    state = await period_books(ledger.engine, "max")
    assert state.total == 250 and balanced(state)
    # restarted with the plan's period a month: the month began before the stored day
    monthly = restarted(ledger, MONTHLY)
    await monthly.reserve("max", utc(2026, 12, 2, 20))
    state = await period_books(ledger.engine, "max")
    assert state.period_start == to_micros(utc(2026, 12, 1, 5))
    assert state.total == 650 and balanced(state)
    assert state.spend == cost_micros(Usage(300, 100), PRICES) + cost_micros(Usage(200, 50), PRICES)
    assert (state.reserved, state.active) == (120, 1), "the reservation is the one asked"


async def test_a_reply_settling_first_after_a_new_default_plan_counts_the_day(
    ledger: Books,
) -> None:
    # the default plan has no period; the user spends, and a reply is still streaming
    # when the server restarts on a daily default. That reply's settlement is the first
    # statement to meet the row: it counts in the day, with the day's earlier usage
    chat = await ledger.user("dax", "")
    await ledger.exchange("dax", chat, utc(2026, 11, 30, 17), Usage(70, 30))
    await ledger.exchange("dax", chat, utc(2026, 12, 2, 14), Usage(200, 50))
    streaming = await ledger.reserve("dax", utc(2026, 12, 2, 15))
    state = await period_books(ledger.engine, "dax")
    assert state.total == 350 and state.period_start == 0 and balanced(state)
    daily = restarted(ledger, DAILY, default_plan="shifting")
    settled = utc(2026, 12, 2, 15, 0, 5)
    await daily.settle(chat, streaming, settled, Usage(5, 5))
    state = await period_books(ledger.engine, "dax")
    assert balanced(state)
    assert (state.reserved, state.reserved_micros, state.active) == (0, 0, 0)
    assert (await daily.shown("dax", settled))[0] == 260
    # and the next reservation starts the day's period with the same sums
    await daily.reserve("dax", settled + timedelta(seconds=1))
    state = await period_books(ledger.engine, "dax")
    assert state.period_start == to_micros(utc(2026, 12, 2, 5))
    assert state.total == 260 and balanced(state)


async def test_a_ledger_row_at_the_new_periods_first_instant_is_in_it(ledger: Books) -> None:
    monthly = restarted(ledger, MONTHLY)
    chat = await monthly.user("ada", "shifting")
    midnight = utc(2026, 12, 2, 5)  # 2 December, 00:00 EST
    before = await monthly.reserve("ada", midnight - timedelta(seconds=1))
    at = await monthly.reserve("ada", midnight - timedelta(seconds=1))
    await monthly.settle(chat, before, midnight - timedelta(microseconds=1), Usage(5, 6))
    await monthly.settle(chat, at, midnight, Usage(3, 4))
    daily = restarted(ledger, DAILY)
    await daily.reserve("ada", midnight + timedelta(hours=1))
    state = await period_books(ledger.engine, "ada")
    assert state.period_start == to_micros(midnight)
    assert (state.total, state.spend) == (7, cost_micros(Usage(3, 4), PRICES))
    assert balanced(state)


async def test_a_period_rolled_by_a_clock_ahead_is_not_rolled_back(ledger: Books) -> None:
    # another worker's clock runs 0.6 s ahead: it settled in the next minute and rolled
    # the row into it. A statement whose clock is still in the minute before does not
    # take the row back to that minute (nor sum the ledger again): the totals go on
    chat = await ledger.user("cleo", "minute")
    boundary = utc(2026, 4, 1, 12, 1)
    await ledger.exchange("cleo", chat, boundary - timedelta(seconds=20), Usage(50, 50))
    await ledger.exchange("cleo", chat, boundary + timedelta(milliseconds=100), Usage(2, 3))
    behind = await ledger.reserve("cleo", boundary - timedelta(milliseconds=500))
    state = await period_books(ledger.engine, "cleo")
    assert state.period_start == to_micros(boundary)
    assert state.total == 5 and balanced(state)
    await ledger.settle(chat, behind, boundary + timedelta(milliseconds=200), Usage(1, 1))
    state = await period_books(ledger.engine, "cleo")
    assert state.total == 7 and balanced(state)


def test_the_statements_of_every_message_never_read_the_ledger() -> None:
    # a sum over the ledger in the reserve or the settle statement, even in a CASE
    # branch never taken, costs PostgreSQL a subplan to set up on every message; the
    # rollover that reads the ledger is the reservation's slow path (`roll_over`)
    book = PlanBook.of(make_settings("sqlite+aiosqlite:///unused.db", plans=PLANS))
    now = utcnow()
    take = take_statement(book, "u", Amounts.of(1, 1), now)
    opening = at_once_ctes(Ask("u", new_id(), 1, 1, book, Decimal(1), "w", 60, now), ASKED)
    settlement = Settlement(
        "u",
        new_id(),
        "m",
        new_id(),
        new_id(),
        "r",
        "complete",
        "stop",
        Usage(1, 1),
        "provider",
        now,
    )
    settles = [next(settle_steps(settlement, writable_ctes=ctes)).text for ctes in (True, False)]
    for text in (take.text, *opening[0], *settles):
        assert "SUM(" not in text.upper() and "FROM usage_events" not in text
