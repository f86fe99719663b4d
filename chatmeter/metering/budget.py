"""Budgets that hold under concurrency (SPEC section 6).

Before a reply streams, one conditional UPDATE reserves the prompt's estimate plus the
output cap; it matches no row when the reservation would pass the limit, so two
concurrent requests can never both pass a check and then both spend. Settlement swaps
the reservation for the real figure in the same transaction that writes the ledger row.

Each reservation is also a row of `reservations` (`reservations.py`: the chat's claim,
its lease, the stop flag).

Plans (SPEC section 10) live in the same statement: the user's plan is resolved in SQL
(`plans.PlanBook`), the rate limits pass (a GCRA arrival time and the count of active
replies) and money is reserved beside the tokens (the tokens at the model's highest
price). Only when it matches no row does a read say why (429, 403) or how much less
still fits. A row whose period is no longer the current one matches no row either: it
is rolled over then, in that transaction (`roll_over`: the totals become the ledger's
sums in the current period; reservations stay), so the statement of every message
never reads the ledger.

The functions are transaction steps (`chatmeter.db.steps`): they yield SQL and are
composed with `yield from` into the transactions of the message path.

Locks are taken in the order `reservations.py` states: the user's row first.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from decimal import Decimal

from chatmeter.db.steps import Conflict, Sql, Steps
from chatmeter.errors import ApiError
from chatmeter.ids import new_id
from chatmeter.metering.cost import reserve_micros, tokens_for_micros
from chatmeter.metering.periods import to_micros
from chatmeter.metering.plans import (
    UNASSIGNED,
    PlanBook,
    Standing,
    retry_after_seconds,
)
from chatmeter.metering.reservations import Reservation, claim_chat, lock_user


@dataclass(frozen=True, slots=True)
class Ask:
    """A reservation asked for: `prompt_estimate + max_output_tokens` of the user's
    budget under `book`, with a lease of `ttl_seconds` for `worker_id`."""

    user_id: str
    chat_id: uuid.UUID | None
    prompt_estimate: int
    max_output_tokens: int
    book: PlanBook
    highest_price: Decimal
    worker_id: str
    ttl_seconds: float
    now: datetime
    # a chat held by a dead process's reservation is released first; False: 409, its
    # reply is settled from its log first (Redis, `streaming/orphans.py`)
    release_expired_claim: bool = True
    # the reservation's id: the caller's choice when it must be able to take the
    # reservation back without an answer (`opening.undo_prompt_opening`)
    reservation_id: uuid.UUID = field(default_factory=new_id)

    @property
    def full(self) -> int:
        return self.prompt_estimate + self.max_output_tokens


def _resets(resets_at: datetime | None) -> dict[str, str]:
    return {"resets_at": resets_at.isoformat()} if resets_at is not None else {}


class BudgetRefused(ApiError):
    """403 TOKEN_BUDGET_EXCEEDED or SPEND_LIMIT_EXCEEDED, with `room`: the most tokens
    the user's limits still held when it was decided (0 when not known). The prompt's
    estimate is a bound that may run well above its real size: a prompt counted exactly
    that fits `room` is worth opening again (`exchange.py`). `room` is never sent."""

    room: int = 0


def budget_exceeded(resets_at: datetime | None = None, room: int = 0) -> BudgetRefused:
    refused = BudgetRefused(
        403,
        "TOKEN_BUDGET_EXCEEDED",
        "Your token budget is spent. Ask an admin to raise it.",
        _resets(resets_at),
    )
    refused.room = room
    return refused


def spend_exceeded(resets_at: datetime | None = None, room: int = 0) -> BudgetRefused:
    refused = BudgetRefused(
        403,
        "SPEND_LIMIT_EXCEEDED",
        "Your spending limit is reached. Ask an admin to raise it.",
        _resets(resets_at),
    )
    refused.room = room
    return refused


def rate_limited(retry_after: int) -> ApiError:
    return ApiError(
        429,
        "RATE_LIMITED",
        f"Too many requests: try again in {retry_after} s.",
        headers={"Retry-After": str(retry_after)},
    )


def reply_in_progress() -> ApiError:
    return ApiError(409, "REPLY_IN_PROGRESS", "A reply is already being generated in this chat.")


def ensure_user(user_id: str, book: PlanBook, now: datetime) -> Steps[None]:
    """Create the user's budget row on first sight, with no plan: the default one,
    whichever is configured (SPEC section 10), until an admin assigns one. Its totals
    are those of the default plan's current period (0: a user first seen has no
    ledger rows), so the first reservation need not roll it over."""
    yield Sql(
        "INSERT INTO user_usage (user_id, total_tokens_used, token_limit, reserved_tokens, "
        "updated_at, plan, token_limit_overridden, period_start, spend_micros, "
        "reserved_micros, active_replies, rate_tat) VALUES (:user_id, 0, :limit, 0, :now, "
        ":plan, :no, CAST(:start AS BIGINT), 0, 0, 0, 0) ON CONFLICT (user_id) DO NOTHING",
        {
            "user_id": user_id,
            "limit": book.plan(book.default).stored_token_limit,
            "now": now,
            "plan": UNASSIGNED,
            "no": False,
            "start": book.period_start_at(book.default, now) or 0,
        },
    )


def _take(
    book: PlanBook, user_id: str, tokens: int, micros: int, now: datetime
) -> Steps[str | None]:
    """Run `take_statement`: the user's plan, None when it matched no row."""
    rows = yield take_statement(book, user_id, Amounts.of(tokens, micros), now)
    return str(rows[0][0]) if rows else None


@dataclass(frozen=True, slots=True)
class Amounts:
    """What a reservation takes, as SQL: values bound as parameters (`of`), or the
    columns `tokens` and `micros` of a CTE `ask` that the same statement computes
    (`ASKED`: PostgreSQL's one-statement opening of a chat fits its prompt in SQL)."""

    tokens: str
    micros: str
    source: str = ""  # the FROM clause that brings them
    params: Mapping[str, object] = field(default_factory=dict)

    @classmethod
    def of(cls, tokens: int, micros: int) -> Amounts:
        params = {"tokens": tokens, "micros": micros}
        return cls("CAST(:tokens AS BIGINT)", "CAST(:micros AS BIGINT)", "", params)


ASKED = Amounts("ask.tokens", "ask.micros", "FROM ask ")


def take_statement(
    book: PlanBook, user_id: str, amounts: Amounts, now: datetime, also: str = ""
) -> Sql:
    """The one atomic statement of SPEC sections 6 and 10: pass the rate limits, and add
    the `amounts` of tokens and money to the user's reservation if both fit under the
    limits (and the condition `also`, if given). Returns the user's plan's name; no row
    when a limit refuses, the user was never seen, or the row's period is not the
    current one: `roll_over` then starts it, in the transaction of `reserve_budget`.
    The statement of every message so never reads the ledger, nor carries the
    subqueries that would (PostgreSQL prepares each subquery of a statement every
    time it runs it, read or not)."""
    tokens = amounts.tokens
    return Sql(
        "UPDATE user_usage SET "
        f"reserved_tokens = reserved_tokens + {tokens}, "
        f"reserved_micros = reserved_micros + {amounts.micros}, "
        "active_replies = active_replies + 1, "
        "rate_tat = (CASE WHEN rate_tat > CAST(:now_us AS BIGINT) THEN rate_tat "
        f"ELSE CAST(:now_us AS BIGINT) END) + {book.emission_sql} "
        f"{amounts.source}WHERE user_id = :user_id AND NOT {book.rolls_sql} "
        f"AND rate_tat <= CAST(:now_us AS BIGINT) + {book.tolerance_sql} "
        f"AND active_replies < {book.concurrency_sql} "
        f"AND {_room_for(book, amounts)} {also}"
        f"RETURNING {book.plan_sql} AS plan",
        {
            "user_id": user_id,
            "now_us": to_micros(now),
            **amounts.params,
            **book.period_params(now),
        },
    )


def roll_over(book: PlanBook, user_id: str, now: datetime) -> Steps[None]:
    """Lock the user's row and, if its period is not the plan's current one, start the
    current one (SPEC section 10): the totals become the sums of the user's ledger rows
    in it. That is 0 when time passed a boundary and nothing settled since, but not
    when the period changed by configuration (a plan's period, the default plan): the
    current period may hold ledger rows already, and a period that now starts earlier
    holds the days before the stored one. Reservations stay. The row is locked before
    the ledger is read (PostgreSQL: by an earlier statement, whose snapshot the sums do
    not use), so no settlement of the user's can be missing from the sums."""
    yield from lock_user(user_id)
    yield Sql(
        f"UPDATE user_usage SET total_tokens_used = {book.tokens_sql}, "
        f"spend_micros = {book.spend_sql}, period_start = CASE WHEN {book.rolls_sql} "
        f"THEN {book.period_start_sql} ELSE period_start END "
        f"WHERE user_id = :user_id AND {book.rolls_sql}",
        {"user_id": user_id, **book.standing_params(now)},
    )


def _room_for(book: PlanBook, amounts: Amounts) -> str:
    """The condition of a `user_usage` row whose token and spend limits still hold
    `amounts` beside what is used and reserved in its period."""
    tokens, micros = amounts.tokens, amounts.micros
    return (
        f"{book.token_limit_sql} - total_tokens_used - reserved_tokens >= {tokens} "
        f"AND ({micros} = 0 OR {book.spend_limit_sql} - spend_micros - reserved_micros "
        f">= {micros})"
    )


class ReservationGone(Exception):
    """The reservation to widen was released before it could be (a stop, its lease run
    out): the widening is rolled back."""


def widen_reservation(
    book: PlanBook,
    reservation: Reservation,
    extra: int,
    highest_price: Decimal,
    now: datetime,
) -> Steps[Reservation | None]:
    """Add `extra` prompt tokens (and their money at `highest_price`) to a reservation
    made by an opening, if the user's limits still hold them: the reservation grown, or
    None (nothing changed). The user's row is taken under the same condition as the
    opening's take (`_room_for`), so concurrent openings and widenings of the user's
    never together pass a limit; the reservation's row grows in the same transaction,
    after the user's row is locked (the lock order of `reservations.py`), so that what
    settlement or a release hands back is what was taken. Raises `ReservationGone`
    (rolling the take back) if the reservation was released meanwhile."""
    total = reserve_micros(reservation.tokens + extra, highest_price)
    micros = max(0, total - reservation.micros)
    amounts = Amounts.of(extra, micros)
    rows = yield Sql(
        "UPDATE user_usage SET reserved_tokens = reserved_tokens + CAST(:tokens AS BIGINT), "
        "reserved_micros = reserved_micros + CAST(:micros AS BIGINT) "
        f"WHERE user_id = :user_id AND NOT {book.rolls_sql} AND {_room_for(book, amounts)} "
        "RETURNING user_id",
        {
            "user_id": reservation.user_id,
            **amounts.params,
            **book.period_params(now),
            "now_us": to_micros(now),
        },
    )
    if not rows:
        return None
    grown = yield Sql(
        "UPDATE reservations SET tokens = tokens + CAST(:tokens AS BIGINT), "
        "micros = micros + CAST(:micros AS BIGINT) WHERE reservation_id = :reservation_id "
        "RETURNING tokens",
        {"reservation_id": reservation.reservation_id, **amounts.params},
    )
    if not grown:
        raise ReservationGone
    return replace(
        reservation,
        tokens=reservation.tokens + extra,
        prompt_estimate=reservation.prompt_estimate + extra,
        micros=reservation.micros + micros,
    )


def give_back_request(user_id: str, book: PlanBook) -> Steps[None]:
    """Un-count one request of the user's against `requests_per_minute`: an opening
    taken back (its outcome was lost, `opening.undo_opening`) is asked for again, and
    the user made one request, not two. The GCRA arrival time goes back by the one
    emission the take added (the caller holds the lock of the user's row)."""
    yield Sql(
        f"UPDATE user_usage SET rate_tat = rate_tat - {book.emission_sql} WHERE user_id = :user_id",
        {"user_id": user_id},
    )


# PostgreSQL: the chat is still active, its row locked FOR KEY SHARE until the opening
# commits. A delete locks it FOR UPDATE (`store.deactivate_chat`), so it waits for an
# opening that got there first (whose reservation its stop then finds), and an opening
# that comes second sees the chat deleted. Settlement's and rename's UPDATEs of the row
# take no lock that KEY SHARE conflicts with.
ACTIVE_CHAT_LOCKED = (
    "SELECT 1 FROM chats WHERE chat_id = CAST(:chat_id AS UUID) AND is_active FOR KEY SHARE"
)


def lock_active_chat(chat_id: uuid.UUID) -> Steps[None]:
    """PostgreSQL: `ACTIVE_CHAT_LOCKED` as a statement of its own; 404 if the chat was
    deleted since the opening read it."""
    rows = yield Sql(ACTIVE_CHAT_LOCKED, {"chat_id": chat_id})
    if not rows:
        raise ApiError(404, "CHAT_NOT_FOUND", "This chat does not exist or was deleted.")


# a chat that holds a reservation (a reply, live or a dead process's) is passed over by
# the one-statement opening, which then writes nothing, rather than refused by the
# reservations' unique key: a unique violation aborts every opening sent with it
# (`Transactor.run_together`). The key still settles two openings of one chat that race.
CHAT_HELD = "SELECT 1 FROM reservations WHERE chat_id = CAST(:chat_id AS UUID)"


def at_once_ctes(ask: Ask, amounts: Amounts) -> tuple[list[str], dict[str, object]]:
    """The CTEs `took` (the user's row, if the chat is still active and locked, see
    `ACTIVE_CHAT_LOCKED`, and holds no reservation, `CHAT_HELD`) and `held` (the
    reservation, written only if `took` was) of a one-statement opening, and their
    parameters. The reservation takes `amounts`."""
    also = (
        f"AND EXISTS ({ACTIVE_CHAT_LOCKED}) AND NOT EXISTS ({CHAT_HELD}) "
        if ask.chat_id is not None
        else ""
    )
    take = take_statement(ask.book, ask.user_id, amounts, ask.now, also)
    ctes = [
        f"took AS ({take.text})",
        "held AS (INSERT INTO reservations (reservation_id, user_id, chat_id, tokens, micros, "
        "worker_id, stop_requested, expires_at, created_at) SELECT "
        "CAST(:reservation_id AS UUID), CAST(:user_id AS VARCHAR), CAST(:chat_id AS UUID), "
        f"{amounts.tokens}, {amounts.micros}, CAST(:worker_id AS VARCHAR), "
        f"FALSE, CAST(:expires_at AS TIMESTAMPTZ), CAST(:now AS TIMESTAMPTZ) FROM took"
        f"{', ask' if amounts.source else ''} RETURNING reservation_id)",
    ]
    params = {
        **take.params,
        "reservation_id": ask.reservation_id,
        "chat_id": ask.chat_id,
        "worker_id": ask.worker_id,
        "expires_at": ask.now + timedelta(seconds=ask.ttl_seconds),
        "now": ask.now,
    }
    return ctes, params


def reserve_at_once(
    ask: Ask, then: str = "", then_params: Mapping[str, object] | None = None
) -> Steps[Reservation | None]:
    """The common case of `reserve_budget` as one statement (PostgreSQL's data-modifying
    CTEs, `at_once_ctes`), then `then`, a CTE of the caller's that writes only if the
    reservation was (it selects from `held`). The statement is atomic, so it writes all
    of that or nothing: None when the take matched no row or the chat is held (a unique
    violation); `reserve_budget` then finds out why, in a transaction."""
    micros = reserve_micros(ask.full, ask.highest_price)
    ctes, params = at_once_ctes(ask, Amounts.of(ask.full, micros))
    if then:
        ctes.append(then)
    try:
        rows = yield Sql(
            f"WITH {', '.join(ctes)} SELECT plan FROM took",
            {**params, **(then_params or {})},
            alone=True,
        )
    except Conflict:
        return None  # the chat holds a reservation: live (409) or a dead process's
    if not rows:
        return None
    return Reservation(
        ask.reservation_id,
        ask.user_id,
        ask.chat_id,
        ask.full,
        ask.prompt_estimate,
        str(rows[0][0]),
        micros,
    )


def _standing(book: PlanBook, user_id: str, now: datetime) -> Steps[Standing | None]:
    rows = yield Sql(
        f"SELECT {book.standing_columns} FROM user_usage WHERE user_id = :user_id",
        {"user_id": user_id, **book.standing_params(now)},
    )
    return Standing.of(book, rows[0], now) if rows else None


def reserve_budget(ask: Ask) -> Steps[Reservation]:
    """Reserve `prompt_estimate + max_output_tokens`, or as much output as the token and
    spend limits still allow (at least one token). Raises, in the order of SPEC sections
    4 and 10: 429 RATE_LIMITED, 403 TOKEN_BUDGET_EXCEEDED or SPEND_LIMIT_EXCEEDED, 409
    REPLY_IN_PROGRESS."""
    granted, plan = yield from _reserve(
        ask.book, ask.user_id, ask.prompt_estimate, ask.full, ask.highest_price, ask.now
    )
    reservation = Reservation(
        ask.reservation_id,
        ask.user_id,
        ask.chat_id,
        granted,
        ask.prompt_estimate,
        plan,
        reserve_micros(granted, ask.highest_price),
    )
    claimed = yield from claim_chat(
        reservation, ask.worker_id, ask.ttl_seconds, ask.now, ask.release_expired_claim
    )
    if not claimed:
        raise reply_in_progress()
    return reservation


def _reserve(
    book: PlanBook,
    user_id: str,
    prompt_estimate: int,
    full: int,
    highest_price: Decimal,
    now: datetime,
) -> Steps[tuple[int, str]]:
    # the common case, a user far from every limit, costs one statement
    plan = yield from _take(book, user_id, full, reserve_micros(full, highest_price), now)
    if plan is not None:
        return full, plan
    for _ in range(3):
        # the user's row locked before it is read: what the read finds is what the take
        # then meets. Unlocked, other openings of the user's that committed in between
        # made each take miss, and the third miss refused a request that had room (or
        # that the rate limits refuse: 429, not 403). A period no longer current is
        # started here, the one place that reads the ledger (`roll_over`)
        yield from roll_over(book, user_id, now)
        standing = yield from _standing(book, user_id, now)
        if standing is None:
            yield from ensure_user(user_id, book, now)
            wanted = full
        else:
            wanted = _allowed(standing, prompt_estimate, full, highest_price, now)
        # conditional again: a row first seen here was not locked by the read
        micros = reserve_micros(wanted, highest_price)
        plan = yield from _take(book, user_id, wanted, micros, now)
        if plan is not None:
            return wanted, plan
    raise budget_exceeded()


def _allowed(
    standing: Standing, prompt_estimate: int, full: int, highest_price: Decimal, now: datetime
) -> int:
    """Why the statement matched no row, as the contract's error, or the smaller
    reservation that still fits (the output cap lowered to what both limits allow)."""
    wait = standing.rate_wait_us(now)
    if wait:
        raise rate_limited(retry_after_seconds(wait))
    if standing.active_replies >= standing.plan.concurrency:
        raise rate_limited(1)
    affordable = tokens_for_micros(standing.spend_room, highest_price)
    # what a smaller (counted) prompt could still be given: both limits' room
    room = standing.tokens_room if affordable is None else min(standing.tokens_room, affordable)
    wanted = min(full, standing.tokens_room)
    if wanted < prompt_estimate + 1:
        raise budget_exceeded(standing.resets_at, room)
    if affordable is not None and affordable < wanted:
        wanted = affordable
        if wanted < prompt_estimate + 1:
            raise spend_exceeded(standing.resets_at, room)
    return wanted
