"""Settlements that could not be written while the database was down.

When retries run out, the settlement is appended to a local spool file (fsynced) and
replayed once the database answers again. Replay is idempotent: the assistant message id
is the key, so a settlement is never billed twice, even if two processes replay the
same file or a crash comes between a replay and the file's rewrite.
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import logging
import os
import re
import uuid
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import orjson

from chatmeter.db.transactor import Transactor
from chatmeter.metering.settlement import Settlement, settle
from chatmeter.providers.base import Usage

log = logging.getLogger("chatmeter.outbox")
T = TypeVar("T")


def _encode(s: Settlement) -> bytes:
    values: dict[str, Any] = asdict(s)
    values["chat_id"] = str(s.chat_id)
    values["reservation_id"] = str(s.reservation_id)
    values["message_id"] = str(s.message_id)
    values["created_at"] = s.created_at.isoformat()
    return orjson.dumps(values) + b"\n"


def _decode(line: bytes) -> Settlement:
    values = orjson.loads(line)
    return Settlement(
        user_id=values["user_id"],
        chat_id=uuid.UUID(values["chat_id"]),
        model=values["model"],
        reservation_id=uuid.UUID(values["reservation_id"]),
        message_id=uuid.UUID(values["message_id"]),
        content=values["content"],
        status=values["status"],
        finish_reason=values["finish_reason"],
        usage=Usage(**values["usage"]),
        source=values["source"],
        created_at=datetime.fromisoformat(values["created_at"]),
        cost_micros=values.get("cost_micros", 0),
        period_start=values.get("period_start"),
    )


def _lines(data: bytes) -> list[bytes]:
    return [line for line in data.splitlines() if line.strip()]


def _locked(path: Path, action: Callable[[BinaryIO], T]) -> T:
    """`action` on the open file under its exclusive lock (a short, local critical
    section: a read, or a rewrite)."""
    with open(path, "r+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        return action(handle)


def _drop(handle: BinaryIO, replayed: set[bytes]) -> None:
    """Rewrite the file without the replayed lines; lines appended meanwhile stay."""
    keep = [line for line in _lines(handle.read()) if line not in replayed]
    handle.seek(0)
    handle.truncate()
    handle.write(b"".join(line + b"\n" for line in keep))
    handle.flush()
    os.fsync(handle.fileno())


class Outbox:
    def __init__(self, directory: str, worker_id: str) -> None:
        self.directory = Path(directory)
        self.path = self.directory / (re.sub(r"[^A-Za-z0-9_.-]", "_", worker_id) + ".jsonl")

    def append(self, s: Settlement) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            handle.write(_encode(s))
            handle.flush()
            os.fsync(handle.fileno())
        log.error("settlement of message %s spooled to %s", s.message_id, self.path)

    def pending(self) -> int:
        if not self.directory.exists():
            return 0
        return sum(len(p.read_bytes().splitlines()) for p in self.directory.glob("*.jsonl"))

    async def run(self, transactor: Transactor, every_seconds: float) -> None:
        """Replay forever (a background task of the app)."""
        while True:
            await asyncio.sleep(every_seconds)
            try:
                if self.pending():
                    await self.replay(transactor)
            except Exception as exc:
                log.warning("outbox replay failed (%s); will retry", exc)

    async def replay(self, transactor: Transactor) -> int:
        """Write every spooled settlement (of any process); returns how many were
        written. Stops at the first failure: the database is still down.

        A file's lock is only ever held for a read or a rewrite, never across an await:
        an append (which takes the lock in this same thread) must never wait on a replay
        that waits on the database."""
        if not self.directory.exists():
            return 0
        written = 0
        for path in sorted(self.directory.glob("*.jsonl")):
            lines = _locked(path, lambda handle: _lines(handle.read()))
            replayed: set[bytes] = set()
            try:
                for line in lines:
                    await settle(transactor, _decode(line), is_retry=True)
                    replayed.add(line)
            finally:
                if replayed:
                    _locked(path, functools.partial(_drop, replayed=replayed))
            written += len(replayed)
            # the emptied file stays: unlinking it could lose a line another process
            # appends between our unlock and the unlink
        if written:
            log.warning("replayed %d spooled settlements", written)
        return written
