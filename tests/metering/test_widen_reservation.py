"""`budget.widen_reservation`: a second take on the user's budget that grows a
reservation already made (the history a chat's exact count puts back, SPEC section 5),
atomic under the same limits as the opening's take, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from chatmeter.db.steps import Steps
from chatmeter.db.tables import reservations, user_usage, utcnow
from chatmeter.db.transactor import Transactor
from chatmeter.metering.budget import (
    Ask,
    ReservationGone,
    reserve_budget,
    widen_reservation,
)
from chatmeter.metering.cost import reserve_micros
from chatmeter.metering.plans import PlanBook
from chatmeter.metering.reservations import Reservation, lock_user, release_reservation
from tests.conftest import make_settings

PRICE = Decimal("1.5")  # micro-units a token: the money follows the tokens


def reserve(book: PlanBook, user: str, prompt: int, output: int) -> Steps[Reservation]:
    return reserve_budget(Ask(user, None, prompt, output, book, PRICE, "w", 60, utcnow()))


def release(user: str, reservation: Reservation) -> Steps[int]:
    yield from lock_user(user)
    return (yield from release_reservation(user, reservation.reservation_id))


async def held(engine: AsyncEngine, user: str) -> tuple[int, int, int, int]:
    """The user's reserved tokens and money, and the sums of their reservations' rows."""
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                sa.select(user_usage.c.reserved_tokens, user_usage.c.reserved_micros).where(
                    user_usage.c.user_id == user
                )
            )
        ).one()
        rows = (
            await conn.execute(
                sa.select(
                    sa.func.coalesce(sa.func.sum(reservations.c.tokens), 0),
                    sa.func.coalesce(sa.func.sum(reservations.c.micros), 0),
                ).where(reservations.c.user_id == user)
            )
        ).one()
    return int(row[0]), int(row[1]), int(rows[0]), int(rows[1])


async def test_concurrent_widenings_never_pass_the_limit(
    database_url: str, transactor: Transactor, audit_engine: AsyncEngine
) -> None:
    book = PlanBook.of(make_settings(database_url, default_token_limit=1000))
    first = await transactor.run(reserve, book, "wes", 100, 50)
    second = await transactor.run(reserve, book, "wes", 100, 50)
    # 700 tokens left: seven of ten widenings of 100 fit, whichever two reservations
    grown = await asyncio.gather(
        *(
            transactor.run(widen_reservation, book, (first, second)[n % 2], 100, PRICE, utcnow())
            for n in range(10)
        )
    )
    assert sum(1 for reservation in grown if reservation is not None) == 7
    tokens, micros, row_tokens, row_micros = await held(audit_engine, "wes")
    assert tokens == row_tokens == 1000 and micros == row_micros
    widened = next(reservation for reservation in grown if reservation is not None)
    assert widened.prompt_estimate == 200 and widened.output_cap == 50
    assert widened.micros == reserve_micros(250, PRICE)


async def test_a_widening_the_limit_does_not_hold_changes_nothing(
    database_url: str, transactor: Transactor, audit_engine: AsyncEngine
) -> None:
    book = PlanBook.of(make_settings(database_url, default_token_limit=1000))
    reservation = await transactor.run(reserve, book, "una", 600, 100)
    before = await held(audit_engine, "una")
    assert await transactor.run(widen_reservation, book, reservation, 301, PRICE, utcnow()) is None
    assert await held(audit_engine, "una") == before
    assert await transactor.run(widen_reservation, book, reservation, 300, PRICE, utcnow())
    assert (await held(audit_engine, "una"))[0] == 1000


async def test_a_reservation_released_meanwhile_is_not_widened(
    database_url: str, transactor: Transactor, audit_engine: AsyncEngine
) -> None:
    book = PlanBook.of(make_settings(database_url, default_token_limit=1000))
    reservation = await transactor.run(reserve, book, "vic", 100, 50)
    assert await transactor.run(release, "vic", reservation) == 1
    with pytest.raises(ReservationGone):
        await transactor.run(widen_reservation, book, reservation, 100, PRICE, utcnow())
    assert await held(audit_engine, "vic") == (0, 0, 0, 0)  # the take was rolled back
