"""Plans at run time (SPEC section 10): each user's limits, periods and rates, as values
and as the SQL fragments the reserve statement evaluates per row.

The plans are few and fixed for the life of a process, so the one reserve statement
carries them in its text (`CASE plan WHEN 'free' THEN 50000 … END`): a user's plan is
resolved by the database in the same UPDATE that reserves, with no read before it. Only
the current periods' starts change over time; they are parameters (`:ps_N` in Unix
microseconds, `:pt_N` the same instant as a timestamp, for the ledger), computed here
from `now`.

The totals of a user's row are always the sums of the user's ledger rows since its
`period_start`. When the row's period is not the plan's current one, the totals become
the sums of the current period's ledger rows: 0 when time passed a boundary and nothing
settled since, but not when the period itself changed by configuration (a plan's period,
or the default plan): the current period may then already hold ledger rows, and a
period that now starts earlier holds days before the stored one (SPEC section 10). The
reads count the sums at once (`tokens_sql`, in a CASE branch that both engines evaluate
only when taken); the reservation's slow path writes them (`budget.roll_over`)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from chatmeter.config import PlanConfig, Settings
from chatmeter.metering.periods import MICROS, Bounds, bounds, to_micros

# "no limit" in the statements' arithmetic: far above any real figure, far below 2**63
UNLIMITED = 2**62
# the highest token limit an admin may set (API and CLI alike): "no limit" itself
MAX_TOKEN_LIMIT = UNLIMITED
MINUTE_US = 60 * MICROS
# `user_usage.plan` of a user no admin assigned a plan: the configured default, whichever
# it is now (SPEC section 10). No plan has this name (names are 1 to 64 characters), so
# every statement resolves it as it resolves a plan no longer configured: the default
UNASSIGNED = ""


@dataclass(frozen=True, slots=True)
class Plan:
    name: str
    token_limit: int | None
    spend_limit_micros: int | None
    period: str
    requests_per_minute: int | None
    concurrent_replies: int | None

    @classmethod
    def of(cls, name: str, config: PlanConfig) -> Plan:
        return cls(
            name,
            config.token_limit,
            config.spend_limit_micros,
            config.period,
            config.requests_per_minute,
            config.concurrent_replies,
        )

    @property
    def stored_token_limit(self) -> int:
        return UNLIMITED if self.token_limit is None else self.token_limit

    @property
    def stored_spend_limit(self) -> int:
        return UNLIMITED if self.spend_limit_micros is None else self.spend_limit_micros

    @property
    def emission_us(self) -> int:
        """GCRA: the time one request takes to refill (60 s / requests_per_minute)."""
        return 0 if self.requests_per_minute is None else MINUTE_US // self.requests_per_minute

    @property
    def tolerance_us(self) -> int:
        """GCRA: how far ahead of now the arrival time may run (a burst of N)."""
        if self.requests_per_minute is None:
            return UNLIMITED
        return (self.requests_per_minute - 1) * self.emission_us

    @property
    def concurrency(self) -> int:
        return UNLIMITED if self.concurrent_replies is None else self.concurrent_replies

    def json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "token_limit": self.token_limit,
            "spend_limit_micros": self.spend_limit_micros,
            "period": self.period,
            "requests_per_minute": self.requests_per_minute,
            "concurrent_replies": self.concurrent_replies,
        }


def _by_plan(values: Mapping[str, str], default: str) -> str:
    """An SQL expression that is `values[plan]` for the row's plan, `values[default]`
    for a plan no longer configured. Plan names are checked at start-up (letters,
    digits, `_.-`), so they are safe as literals."""
    otherwise = values[default]
    branches = [f"WHEN '{name}' THEN {v}" for name, v in values.items() if v != otherwise]
    if not branches:
        return otherwise
    return f"(CASE plan {' '.join(branches)} ELSE {otherwise} END)"


@dataclass(frozen=True, slots=True)
class PlanBook:
    """Every configured plan, the default one, and the reserve statement's fragments."""

    plans: Mapping[str, Plan]
    default: str
    timezone: str
    currency: str
    periods: tuple[str, ...]  # the distinct periods of the plans: `:ps_N` is periods[N]
    period_start_sql: str  # the current period's start for the row's plan
    token_limit_sql: str
    spend_limit_sql: str
    emission_sql: str
    tolerance_sql: str
    concurrency_sql: str
    plan_sql: str  # the name of the row's plan (`UNASSIGNED`: the default's)
    # the row's period is not its plan's current one (needs `:now_us` and `:ps_N`)
    rolls_sql: str
    # the row's totals as of now: the stored ones, or on a rollover the ledger's sums in
    # the current period (`:pt_N`); what the reads and `budget.roll_over` count
    tokens_sql: str
    spend_sql: str
    # the last bounds computed per period: a period changes rarely, and computing one in
    # a timezone costs ~10 us per statement (an object's cache, not the module's)
    recent: dict[str, Bounds] = field(default_factory=dict)

    @classmethod
    def of(cls, settings: Settings) -> PlanBook:
        plans = {name: Plan.of(name, config) for name, config in settings.plans.items()}
        default = settings.default_plan
        periods = tuple(sorted({p.period for p in plans.values() if p.period != "none"}))

        def start(plan: Plan) -> str:
            # a plan without a period keeps the stored start: it never rolls over
            if plan.period == "none":
                return "period_start"
            return f"CAST(:ps_{periods.index(plan.period)} AS BIGINT)"

        def each(value: Any) -> dict[str, str]:
            return {name: str(value(plan)) for name, plan in plans.items()}

        plan_limit = _by_plan(each(lambda p: p.stored_token_limit), default)
        period_start = _by_plan(each(start), default)
        # a period that is not the current one rolls over, earlier or later (a plan's
        # period changed by configuration), unless it lies ahead of `now`: then another
        # process whose clock runs ahead rolled it, and the totals go on
        rolls = f"(period_start <> {period_start} AND period_start <= CAST(:now_us AS BIGINT))"
        index = _by_plan(
            each(lambda p: periods.index(p.period) if p.period in periods else -1), default
        )
        ledger_tokens = _ledger_sum("total_tokens", index, len(periods))
        ledger_spend = _ledger_sum("cost_micros", index, len(periods))
        return cls(
            plans=plans,
            default=default,
            timezone=settings.timezone,
            currency=settings.currency,
            periods=periods,
            period_start_sql=period_start,
            token_limit_sql=(
                f"(CASE WHEN token_limit_overridden THEN token_limit ELSE {plan_limit} END)"
            ),
            spend_limit_sql=_by_plan(each(lambda p: p.stored_spend_limit), default),
            emission_sql=_by_plan(each(lambda p: p.emission_us), default),
            tolerance_sql=_by_plan(each(lambda p: p.tolerance_us), default),
            concurrency_sql=_by_plan(each(lambda p: p.concurrency), default),
            plan_sql=_by_plan({name: f"'{name}'" for name in plans}, default),
            rolls_sql=rolls,
            tokens_sql=f"(CASE WHEN {rolls} THEN {ledger_tokens} ELSE total_tokens_used END)",
            spend_sql=f"(CASE WHEN {rolls} THEN {ledger_spend} ELSE spend_micros END)",
        )

    def plan(self, name: str | None) -> Plan:
        """The plan of that name; a plan no longer configured is the default one."""
        found = self.plans.get(name) if name is not None else None
        return found if found is not None else self.plans[self.default]

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def bounds(self, plan: Plan, now: datetime) -> Bounds | None:
        return self.current(plan.period, now)

    def current(self, period: str, now: datetime) -> Bounds | None:
        """The period containing `now` (None for `none`)."""
        known = self.recent.get(period)
        if known is not None and known.start <= now < known.end:
            return known
        found = bounds(period, now, self.zone)
        if found is not None:
            self.recent[period] = found
        return found

    def period_start_at(self, plan_name: str, moment: datetime) -> int | None:
        """The start of the plan's period containing `moment`; None without a period."""
        current = self.bounds(self.plan(plan_name), moment)
        return current.start_micros if current is not None else None

    def period_params(self, now: datetime) -> dict[str, int]:
        """`:ps_N` of the statements: each period's current start."""
        params: dict[str, int] = {}
        for index, period in enumerate(self.periods):
            current = self.current(period, now)
            assert current is not None
            params[f"ps_{index}"] = current.start_micros
        return params

    def standing_params(self, now: datetime) -> dict[str, object]:
        """The parameters of `rolls_sql`, `tokens_sql` and `spend_sql` (of
        `standing_columns`): `:now_us`, `:ps_N`, and `:pt_N`, each period's current
        start as a timestamp, which the ledger's index is ordered by."""
        params: dict[str, object] = {"now_us": to_micros(now), **self.period_params(now)}
        for index, period in enumerate(self.periods):
            current = self.current(period, now)
            assert current is not None
            params[f"pt_{index}"] = current.start
        return params

    @property
    def standing_columns(self) -> str:
        """The columns `Standing.of` reads, in its order, as of `standing_params`: the
        totals rolled over as the next reserve statement would roll them."""
        return (
            f"plan, token_limit_overridden, token_limit, {self.tokens_sql}, reserved_tokens, "
            f"{self.spend_sql}, reserved_micros, active_replies, rate_tat"
        )


def _ledger_sum(column: str, index: str, periods: int) -> str:
    """The sum of `column` over the row's user's ledger rows in the current period of
    the row's plan, whose period is `periods[index]` (-1: none, never asked for). The
    start is compared as it is bound, a timestamp, so the index on (user_id, created_at)
    serves the sum on both engines."""
    sums = [
        f"(SELECT CAST(COALESCE(SUM(e.{column}), 0) AS BIGINT) FROM usage_events AS e "
        f"WHERE e.user_id = user_usage.user_id AND e.created_at >= :pt_{n})"
        for n in range(periods)
    ]
    if not sums:
        return "0"
    if len(sums) == 1:
        return sums[0]
    branches = " ".join(f"WHEN {n} THEN {sql}" for n, sql in enumerate(sums))
    return f"(CASE {index} {branches} ELSE 0 END)"


def limit_of(plan: Plan, token_limit: int, overridden: bool) -> int | None:
    """The user's token limit: an admin's override, else the plan's (None: no limit)."""
    return token_limit if overridden else plan.token_limit


def retry_after_seconds(micros: int) -> int:
    """`Retry-After` in whole seconds, at least 1."""
    return max(1, math.ceil(micros / MICROS))


@dataclass(frozen=True, slots=True)
class Standing:
    """A user's budget row as of `now`: what the reserve statement sees, rollover
    included (`PlanBook.standing_columns`: a period no longer current counts as the
    current one's ledger sums even before a statement rolled it)."""

    plan: Plan
    bounds: Bounds | None
    token_limit: int | None
    total_tokens_used: int
    reserved_tokens: int
    spend_micros: int
    reserved_micros: int
    active_replies: int
    rate_tat: int

    @classmethod
    def of(cls, book: PlanBook, row: tuple[Any, ...], now: datetime) -> Standing:
        name, overridden, limit, total, reserved, spend, reserved_micros, active, tat = row
        plan = book.plan(name)
        current = book.bounds(plan, now)
        return cls(
            plan=plan,
            bounds=current,
            token_limit=limit_of(plan, int(limit), bool(overridden)),
            total_tokens_used=int(total),
            reserved_tokens=int(reserved),
            spend_micros=int(spend),
            reserved_micros=int(reserved_micros),
            active_replies=int(active),
            rate_tat=int(tat),
        )

    @property
    def resets_at(self) -> datetime | None:
        return self.bounds.end if self.bounds is not None else None

    @property
    def tokens_room(self) -> int:
        limit = UNLIMITED if self.token_limit is None else self.token_limit
        return limit - self.total_tokens_used - self.reserved_tokens

    @property
    def spend_room(self) -> int:
        return self.plan.stored_spend_limit - self.spend_micros - self.reserved_micros

    def rate_wait_us(self, now: datetime) -> int:
        """How long until the rate limit lets one more request through (0: now)."""
        return max(0, self.rate_tat - self.plan.tolerance_us - to_micros(now))
