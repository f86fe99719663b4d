"""The readers of plain-SQL rows: what SQLite stores reads back as PostgreSQL's values."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone

from chatmeter.db.rows import as_datetime, as_optional_datetime, as_optional_uuid
from chatmeter.db.steps import sqlite_value
from chatmeter.ids import as_uuid


def test_a_moment_stored_on_sqlite_reads_back_aware_in_utc() -> None:
    moment = datetime(2026, 3, 8, 6, 59, 1, 123456, tzinfo=timezone(timedelta(hours=-5)))
    read = as_datetime(sqlite_value(moment))
    assert read == moment and read.tzinfo is UTC
    assert sqlite_value(moment) == "2026-03-08 11:59:01.123456"
    assert sqlite_value(datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)) == "2026-01-02 03:04:05.000000"
    assert sqlite_value(True) == 1 and sqlite_value("text") == "text"
    # whole seconds are stored with their zero microseconds, and the server's own
    # CURRENT_TIMESTAMP without any
    assert as_datetime("2026-01-02 03:04:05.000000") == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert as_datetime("2026-01-02 03:04:05") == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def test_a_moment_from_postgresql_is_kept_and_put_in_utc() -> None:
    paris = timezone(timedelta(hours=1))
    read = as_datetime(datetime(2026, 1, 1, 1, 0, tzinfo=paris))
    assert read == datetime(2026, 1, 1, 0, 0, tzinfo=UTC) and read.tzinfo is UTC
    assert as_datetime(datetime(2026, 1, 1)).tzinfo is UTC  # naive: stored as UTC


def test_uuids_read_back_from_32_hex_digits_or_as_they_are() -> None:
    value = uuid.uuid4()
    assert as_uuid(sqlite_value(value)) == value
    assert as_uuid(value) is value
    assert as_optional_uuid(None) is None and as_optional_datetime(None) is None
