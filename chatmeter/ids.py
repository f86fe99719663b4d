"""Row ids: UUIDv7 (RFC 9562), a millisecond timestamp followed by 74 random bits.

Ids made one after another sort together, so the primary-key and unique indexes of the
message path (messages, usage_events, reservations) grow at their right edge: a commit
writes the few index pages that edge spans, where random (version 4) ids touched a
different leaf page for every row, some ten pages of WAL per exchange."""

from __future__ import annotations

import os
import time
import uuid

_RAND_B = (1 << 62) - 1


def new_id() -> uuid.UUID:
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")  # 80 bits, 74 of them used
    return uuid.UUID(
        int=(ms & 0xFFFF_FFFF_FFFF) << 80
        | 0x7 << 76
        | (rand >> 68) << 64
        | 0b10 << 62
        | (rand & _RAND_B)
    )


def as_uuid(value: object) -> uuid.UUID:
    """A uuid column as read back: native on PostgreSQL, 32 hex digits on SQLite."""
    return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))
