"""Budget periods (SPEC section 10): calendar periods in the configured timezone, DST and
month lengths included, and fixed lengths aligned to the Unix epoch."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from chatmeter.metering.periods import bounds, from_micros, parse_period, to_micros

NEW_YORK = ZoneInfo("America/New_York")
PARIS = ZoneInfo("Europe/Paris")
UTC_ZONE = ZoneInfo("UTC")  # what CHATMETER_TIMEZONE gives by default


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


def test_a_day_starts_at_local_midnight() -> None:
    day = bounds("day", utc(2026, 6, 10, 3, 30), PARIS)  # 05:30 in Paris (UTC+2)
    assert day is not None
    assert (day.start, day.end) == (utc(2026, 6, 9, 22), utc(2026, 6, 10, 22))
    before_midnight = bounds("day", utc(2026, 6, 9, 21, 59, 59), PARIS)
    assert before_midnight is not None and before_midnight.end == day.start


def test_days_across_dst_changes_are_23_and_25_hours() -> None:
    spring = bounds("day", utc(2026, 3, 8, 17), NEW_YORK)  # clocks go forward at 2:00
    assert spring is not None
    assert spring.start == utc(2026, 3, 8, 5)  # midnight EST (UTC-5)
    assert spring.end == utc(2026, 3, 9, 4)  # midnight EDT (UTC-4)
    assert spring.end - spring.start == timedelta(hours=23)
    autumn = bounds("day", utc(2026, 11, 1, 17), NEW_YORK)  # clocks go back at 2:00
    assert autumn is not None
    assert (autumn.start, autumn.end) == (utc(2026, 11, 1, 4), utc(2026, 11, 2, 5))
    assert autumn.end - autumn.start == timedelta(hours=25)
    # the instant after the change belongs to the same day
    later = bounds("day", utc(2026, 11, 1, 6, 30), NEW_YORK)  # 01:30 EST, the second one
    assert later == autumn


def test_a_midnight_skipped_by_dst_still_starts_the_day() -> None:
    santiago = ZoneInfo("America/Santiago")  # clocks go from 24:00 to 01:00
    day = bounds("day", utc(2026, 9, 6, 15), santiago)
    assert day is not None
    local_start = day.start.astimezone(santiago)
    assert local_start.date().isoformat() == "2026-09-06"
    assert local_start.hour in (0, 1)
    assert day.start <= utc(2026, 9, 6, 15) < day.end


def test_a_week_starts_on_monday() -> None:
    week = bounds("week", utc(2026, 12, 3, 12), PARIS)  # a Thursday
    assert week is not None
    assert week.start.astimezone(PARIS).weekday() == 0
    assert week.start == utc(2026, 11, 29, 23)  # Monday 30 November, 00:00 CET
    assert week.end == utc(2026, 12, 6, 23)


def test_months_follow_their_lengths_from_31_january_to_1_march() -> None:
    january = bounds("month", utc(2026, 1, 31, 23, 59), UTC_ZONE)
    february = bounds("month", utc(2026, 2, 1), UTC_ZONE)
    march = bounds("month", utc(2026, 3, 1), UTC_ZONE)
    assert january is not None and february is not None and march is not None
    assert (january.start, january.end) == (utc(2026, 1, 1), utc(2026, 2, 1))
    assert (february.start, february.end) == (utc(2026, 2, 1), utc(2026, 3, 1))
    assert february.end - february.start == timedelta(days=28)
    assert march.start == february.end
    leap = bounds("month", utc(2028, 2, 29, 12), UTC_ZONE)
    assert leap is not None and leap.end == utc(2028, 3, 1)
    december = bounds("month", utc(2026, 12, 31, 23), UTC_ZONE)
    assert december is not None and december.end == utc(2027, 1, 1)
    # a month in New York across the March DST change
    ny = bounds("month", utc(2026, 3, 20), NEW_YORK)
    assert ny is not None and (ny.start, ny.end) == (utc(2026, 3, 1, 5), utc(2026, 4, 1, 4))


def test_fixed_lengths_are_aligned_to_the_epoch() -> None:
    window = bounds("30s", utc(2026, 5, 5, 10, 0, 47), PARIS)
    assert window is not None
    assert (window.start, window.end) == (utc(2026, 5, 5, 10, 0, 30), utc(2026, 5, 5, 10, 1))
    week = bounds("7d", utc(2026, 5, 5), UTC_ZONE)
    assert week is not None
    assert to_micros(week.start) % (7 * 86400 * 10**6) == 0
    assert week.start <= utc(2026, 5, 5) < week.end
    assert bounds("6h", utc(2026, 5, 5, 13), PARIS) is not None
    assert bounds("none", utc(2026, 5, 5), UTC_ZONE) is None


def test_microseconds_are_exact() -> None:
    moment = datetime(2026, 5, 5, 10, 0, 0, 123456, tzinfo=UTC)
    assert from_micros(to_micros(moment)) == moment
    assert to_micros(datetime(1970, 1, 1, tzinfo=UTC)) == 0


@pytest.mark.parametrize(
    "bad", ["", "daily", "0s", "10", "5y", "1.5h", "-1d", " day", "1000001d", "999999999h"]
)
def test_bad_periods_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_period(bad)


@pytest.mark.parametrize("longest", ["1000000d", "24000000h", "999999999m", "999999999s"])
def test_the_longest_fixed_lengths_have_bounds(longest: str) -> None:
    # a period accepted at start-up is one every statement can compute: "999999999h"
    # was accepted, and its end (year 116,000) raised OverflowError in every reservation
    assert parse_period(longest) == longest
    now = datetime(2026, 12, 2, 10, 0, tzinfo=UTC)
    period = bounds(longest, now, UTC_ZONE)
    assert period is not None and period.start <= now < period.end
