"""Column values as read back by the steps (`steps.py`), typed the same on both databases
(a uuid: `ids.as_uuid`).

PostgreSQL (asyncpg) returns native values; SQLite returns what `steps.sqlite_value`
and SQLAlchemy's types stored: uuids as 32 hex digits, timestamps as UTC text
'YYYY-MM-DD HH:MM:SS.ffffff', booleans as 0 and 1."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from chatmeter.ids import as_uuid


def as_datetime(value: object) -> datetime:
    """A timestamp column, timezone-aware in UTC."""
    if isinstance(value, datetime):
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return datetime.fromisoformat(str(value)).replace(tzinfo=UTC)


def as_optional_datetime(value: object) -> datetime | None:
    return None if value is None else as_datetime(value)


def as_optional_uuid(value: object) -> uuid.UUID | None:
    return None if value is None else as_uuid(value)
