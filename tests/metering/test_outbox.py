"""The outbox never holds its file lock across an await: spooling a settlement while a
replay waits on a dead database must not hang the process."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from chatmeter.metering.outbox import Outbox
from chatmeter.metering.settlement import Settlement
from chatmeter.providers.base import Usage
from tests.support.waiting import eventually


def settlement() -> Settlement:
    return Settlement(
        user_id="u",
        chat_id=uuid.uuid4(),
        model="m",
        reservation_id=uuid.uuid4(),
        message_id=uuid.uuid4(),
        content="partial",
        status="interrupted",
        finish_reason="interrupted",
        usage=Usage(3, 4),
        source="counted",
        created_at=datetime.now(UTC),
    )


class DeadDatabase:
    """A transactor whose database takes a while to fail, as an unreachable one does."""

    writable_ctes = False

    def __init__(self) -> None:
        self.calls = 0

    async def run(self, steps: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        await asyncio.sleep(0.3)
        raise ConnectionRefusedError("database down")

    async def run_together(
        self, order: str, steps: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> Any:
        return await self.run(steps, *args, **kwargs)

    async def caught_up(self) -> None:
        return None

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


async def test_append_during_a_stalled_replay_does_not_hang(tmp_path: Path) -> None:
    outbox = Outbox(str(tmp_path), "worker-1")
    first, second = settlement(), settlement()
    outbox.append(first)
    dead = DeadDatabase()
    replay = asyncio.create_task(outbox.replay(dead))
    await eventually(lambda: dead.calls == 1)  # the replay now waits on the database
    async with asyncio.timeout(2):
        # synchronous: with the lock held across the replay's await, this blocked the
        # event loop for good
        await asyncio.to_thread(lambda: None)
        outbox.append(second)
    with pytest.raises(ConnectionRefusedError):
        await replay
    assert dead.calls == 1
    assert outbox.pending() == 2  # nothing replayed, nothing lost
