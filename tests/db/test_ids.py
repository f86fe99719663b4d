"""Row ids are UUIDv7: valid RFC 9562 ids whose order follows the clock."""

from __future__ import annotations

import time
import uuid

from chatmeter.ids import new_id


def test_ids_are_version_7_with_the_rfc_variant() -> None:
    ids = [new_id() for _ in range(1000)]
    assert all(i.version == 7 and i.variant == uuid.RFC_4122 for i in ids)
    assert len(set(ids)) == 1000  # 74 random bits each


def test_ids_sort_in_the_order_they_were_made_across_milliseconds() -> None:
    made = []
    for _ in range(5):
        made.append(new_id())
        time.sleep(0.002)
    assert sorted(made) == made
    assert sorted(i.hex for i in made) == [i.hex for i in made]  # as SQLite stores them
    now_ms = time.time_ns() // 1_000_000
    assert 0 <= now_ms - (made[-1].int >> 80) < 1000
