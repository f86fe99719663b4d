"""Usage summaries (SPEC section 10): the ledger's sums by day, model or user over a
range of days in the configured timezone, as JSON rows or CSV.

By model or user, the database groups. By day, it groups by quarter hour in UTC (every
timezone's offset today is a whole number of quarter hours) and the quarters are added up
into local days here: the database does the heavy part the same way on SQLite and
PostgreSQL, and days follow DST exactly."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any, Literal
from zoneinfo import ZoneInfo

from chatmeter.db.steps import Sql, Steps
from chatmeter.errors import ApiError
from chatmeter.metering.periods import EPOCH

GroupBy = Literal["day", "model", "user"]
SUM_FIELDS = (
    "prompt_tokens",
    "completion_tokens",
    "thinking_tokens",
    "cached_tokens",
    "total_tokens",
    "cost_micros",
)
DEFAULT_DAYS = 30
MOST_DAYS = 366
# the days whose local midnights, and the midnight after, are moments in every timezone
# (no offset reaches a day): the first and the last day of the calendar are not
EARLIEST_DAY = date.min + timedelta(days=1)
LATEST_DAY = date.max - timedelta(days=1)
QUARTER_SECONDS = 900
# what the contract names: date.fromisoformat alone also reads ISO week dates of the same
# length ("2026-W01-1", "2026W011  " are 2025-12-29), a range the client never asked for
_DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def _invalid(message: str) -> ApiError:
    return ApiError(400, "INVALID_REQUEST", message)


def _day(raw: str, name: str) -> date:
    try:
        if not _DAY.fullmatch(raw):
            raise ValueError
        return date.fromisoformat(raw)
    except ValueError:
        raise _invalid(f"{name}: a date written YYYY-MM-DD is required") from None


@dataclass(frozen=True, slots=True)
class DayRange:
    first: date
    last: date  # inclusive

    @classmethod
    def parse(cls, raw_from: str | None, raw_to: str | None, today: date) -> DayRange:
        last = _day(raw_to, "to") if raw_to is not None else today
        if raw_from is not None:
            first = _day(raw_from, "from")
        else:
            earliest = max(EARLIEST_DAY.toordinal(), last.toordinal() - (DEFAULT_DAYS - 1))
            first = date.fromordinal(earliest)
        if not all(EARLIEST_DAY <= day <= LATEST_DAY for day in (first, last)):
            raise _invalid(f"from, to: days from {EARLIEST_DAY} to {LATEST_DAY} are reported")
        if first > last:
            raise _invalid("from: must not be after to")
        if (last - first).days + 1 > MOST_DAYS:
            raise _invalid(f"from, to: at most {MOST_DAYS} days at a time")
        return cls(first, last)

    def instants(self, zone: ZoneInfo) -> tuple[datetime, datetime]:
        """From the first day's local midnight to the midnight after the last day."""
        following = self.last + timedelta(days=1)
        start = datetime(self.first.year, self.first.month, self.first.day, tzinfo=zone)
        end = datetime(following.year, following.month, following.day, tzinfo=zone)
        return start, end


def group_by(raw: str, allowed: tuple[str, ...]) -> GroupBy:
    if raw not in allowed:
        raise _invalid(f"group_by: must be one of {', '.join(allowed)}")
    return raw  # type: ignore[return-value]


# the quarter hour (since the epoch, UTC) of a ledger row: the one expression the two
# databases spell differently. SQLite's strftime rounds to the millisecond (a row at
# 23:59:59.9995 would be 00:00:00, the next day): it is given the whole seconds only
_QUARTER = {
    True: (
        "CAST(CAST(strftime('%s', substr(created_at, 1, 19)) AS INTEGER) "
        f"/ {QUARTER_SECONDS} AS INTEGER)"
    ),
    False: f"CAST(floor(extract(epoch FROM created_at) / {QUARTER_SECONDS}) AS BIGINT)",
}
_KEYS = {"model": "model", "user": "user_id"}


def summarize(
    days: DayRange, zone: ZoneInfo, by: GroupBy, user_id: str | None, sqlite: bool
) -> Steps[list[dict[str, Any]]]:
    """The ledger's sums over `days`, grouped `by` (`sqlite`: the database is SQLite)."""
    start, end = days.instants(zone)
    key = _QUARTER[sqlite] if by == "day" else _KEYS[by]
    sums = ", ".join(f"COALESCE(SUM({field}), 0)" for field in SUM_FIELDS)
    mine = " AND user_id = :user_id" if user_id is not None else ""
    rows = yield Sql(
        f"SELECT {key}, COUNT(*), {sums} FROM usage_events "
        f"WHERE created_at >= :start AND created_at < :end{mine} GROUP BY 1",
        {"start": start, "end": end, **({"user_id": user_id} if user_id is not None else {})},
        alone=True,
        wide=True,
    )
    totals: dict[str, list[int]] = {}
    for group, *figures in rows:
        if by == "day":
            moment = EPOCH + timedelta(seconds=int(group) * QUARTER_SECONDS)
            group = moment.astimezone(zone).date().isoformat()
        into = totals.setdefault(str(group), [0] * (len(SUM_FIELDS) + 1))
        for index, figure in enumerate(figures):
            into[index] += int(figure)
    return [
        {by: group, "requests": figures[0], **dict(zip(SUM_FIELDS, figures[1:], strict=True))}
        for group, figures in sorted(totals.items())
    ]


def as_csv(rows: Iterable[dict[str, Any]], by: GroupBy) -> str:
    out = io.StringIO()
    columns = [by, "requests", *SUM_FIELDS]
    csv.writer(out, lineterminator="\r\n").writerow(columns)
    # every text cell in quotes: one holding a `;` was written bare, and a spreadsheet
    # whose list separator is `;` split it, a formula in the second part
    writer = csv.writer(out, lineterminator="\r\n", quoting=csv.QUOTE_NONNUMERIC)
    for row in rows:
        writer.writerow([_safe_cell(row[c]) for c in columns])
    return out.getvalue()


def _safe_cell(value: Any) -> Any:
    """A user id or model name that a spreadsheet would run as a formula is quoted."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value
