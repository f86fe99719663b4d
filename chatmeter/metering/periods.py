"""Budget periods (SPEC section 10): calendar days, weeks and months in the configured
timezone, or fixed lengths aligned to the Unix epoch.

A period is named by its start as an integer of Unix microseconds: that is what
`user_usage.period_start` holds and what the statements compare, the same way on SQLite
and PostgreSQL. Nothing here runs on a schedule: the statements compare the stored start
with the current one (`bounds`), and the reservation rolls over when they differ
(`plans`, `budget.roll_over`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
CALENDAR = ("day", "week", "month")
_FIXED = re.compile(r"([1-9][0-9]{0,8})([smhd])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MICROS = 1_000_000
# the longest fixed length: a million days (some 2,700 years). Much longer ones (the
# pattern matches up to 999999999 of a unit) end past the last moment a datetime holds
# (year 9999), and every statement, which computes every plan's period, would fail
MOST_FIXED_SECONDS = 1_000_000 * 86_400


def parse_period(value: str) -> str:
    """The period as configured, checked: none | day | week | month | N s/m/h/d."""
    if value in ("none", *CALENDAR):
        return value
    seconds = fixed_seconds(value)
    if seconds is not None and seconds <= MOST_FIXED_SECONDS:
        return value
    raise ValueError(
        'must be none, day, week, month or a fixed length like "30s", "15m", "6h", "7d" '
        "of at most 1000000 days"
    )


def fixed_seconds(period: str) -> int | None:
    match = _FIXED.fullmatch(period)
    return int(match[1]) * _UNIT_SECONDS[match[2]] if match else None


def to_micros(moment: datetime) -> int:
    """Unix microseconds, exactly (no float)."""
    return (moment - EPOCH) // timedelta(microseconds=1)


def from_micros(micros: int) -> datetime:
    return EPOCH + timedelta(microseconds=micros)


def _local_midnight(year: int, month: int, day: int, zone: ZoneInfo) -> datetime:
    """The instant a local date begins. A midnight skipped by a DST change (fold=0
    takes the offset before it) maps to the first instant of the day all the same."""
    return datetime(year, month, day, tzinfo=zone).astimezone(UTC)


@dataclass(frozen=True, slots=True)
class Bounds:
    start: datetime  # UTC, inclusive
    end: datetime  # UTC, exclusive: when the period resets

    @property
    def start_micros(self) -> int:
        return to_micros(self.start)


def bounds(period: str, now: datetime, zone: ZoneInfo) -> Bounds | None:
    """The period containing `now`; None for `none`."""
    if period == "none":
        return None
    seconds = fixed_seconds(period)
    if seconds is not None:
        length = seconds * MICROS
        start = to_micros(now) // length * length
        return Bounds(from_micros(start), from_micros(start + length))
    local = now.astimezone(zone)
    if period == "day":
        first = local.date()
        following = first + timedelta(days=1)
    elif period == "week":
        first = local.date() - timedelta(days=local.weekday())
        following = first + timedelta(days=7)
    else:  # month
        first = local.date().replace(day=1)
        following = (first + timedelta(days=32)).replace(day=1)
    return Bounds(
        _local_midnight(first.year, first.month, first.day, zone),
        _local_midnight(following.year, following.month, following.day, zone),
    )
