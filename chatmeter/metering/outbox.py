"""Settlements that could not be written while the database was down.

When retries run out, the settlement is appended to a local spool file (fsynced) and
replayed once the database answers again. Replay is idempotent: the assistant message id
is the key, so a settlement is never billed twice, even if two processes replay the
same file or a crash comes between a replay and the file's rewrite.

Replay tells two failures apart. The database is down (or busy): stop, and try every
line again later. This line is bad (torn by a crash mid-append, or a settlement the
database refuses for what it says, such as a chat that no longer exists): move it to
the dead letters next to the outbox (`<file>.dead`, the line as it was, for an operator
to look at), log an ERROR naming the message, count it in /metrics
(`chatmeter_outbox_dead_letters`), and go on with the next line and the next files: one
bad line never holds back the settlements after it.
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

from chatmeter.db.transactor import Transactor, refused_for_good
from chatmeter.metering.settlement import Settlement, settle
from chatmeter.observability.metrics import Metrics
from chatmeter.providers.base import Usage

log = logging.getLogger("chatmeter.outbox")
T = TypeVar("T")


def _encode(s: Settlement) -> bytes:
    values: dict[str, Any] = asdict(s)
    values["chat_id"] = None if s.chat_id is None else str(s.chat_id)
    values["reservation_id"] = str(s.reservation_id)
    values["message_id"] = str(s.message_id)
    values["created_at"] = s.created_at.isoformat()
    return orjson.dumps(values) + b"\n"


def _decode(line: bytes) -> Settlement:
    values = orjson.loads(line)
    return Settlement(
        user_id=values["user_id"],
        chat_id=None if values["chat_id"] is None else uuid.UUID(values["chat_id"]),
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
    )


def _lines(data: bytes) -> list[bytes]:
    return [line for line in data.splitlines() if line.strip()]


def _locked(path: Path, action: Callable[[BinaryIO], T]) -> T:
    """`action` on the open file under its exclusive lock (a short, local critical
    section: a read, or a rewrite)."""
    with open(path, "r+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        return action(handle)


def _message_id(line: bytes) -> str:
    """The message id of a spooled line, as far as it can be read."""
    found = re.search(rb'"message_id":"([0-9a-fA-F-]{36})"', line)
    return found.group(1).decode() if found else "(unreadable)"


def _rewrite(
    handle: BinaryIO, replayed: set[bytes], dead: set[bytes], dead_path: Path
) -> list[bytes]:
    """Rewrite the file without the replayed lines and the dead ones; lines appended
    meanwhile stay. The dead lines still here (another process replaying the same file
    may have moved them already) are appended to `dead_path` first, and returned."""
    lines = _lines(handle.read())
    moved = [line for line in lines if line in dead]
    if moved:
        with open(dead_path, "ab") as letters:
            letters.write(b"".join(line + b"\n" for line in moved))
            letters.flush()
            os.fsync(letters.fileno())
    keep = [line for line in lines if line not in replayed and line not in dead]
    handle.seek(0)
    handle.truncate()
    handle.write(b"".join(line + b"\n" for line in keep))
    handle.flush()
    os.fsync(handle.fileno())
    return moved


class Outbox:
    def __init__(self, directory: str, worker_id: str, metrics: Metrics | None = None) -> None:
        self.directory = Path(directory)
        self.path = self.directory / (re.sub(r"[^A-Za-z0-9_.-]", "_", worker_id) + ".jsonl")
        self._metrics = metrics

    def append(self, s: Settlement) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            line = _encode(s)
            if handle.seek(0, os.SEEK_END) > 0:
                handle.seek(-1, os.SEEK_END)
                if handle.read(1) != b"\n":
                    # a line torn by a crash mid-append stays a line of its own (a dead
                    # letter) instead of swallowing the beginning of this one
                    line = b"\n" + line
            handle.write(line)  # "a" mode: at the end, wherever we looked
            handle.flush()
            os.fsync(handle.fileno())
        log.error("settlement of message %s spooled to %s", s.message_id, self.path)

    def pending(self) -> int:
        if not self.directory.exists():
            return 0
        return sum(len(_lines(p.read_bytes())) for p in self.directory.glob("*.jsonl"))

    def dead_letters(self) -> int:
        """How many lines the dead letters of this directory hold."""
        if not self.directory.exists():
            return 0
        return sum(len(_lines(p.read_bytes())) for p in self.directory.glob("*.dead"))

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
        """Write every spooled settlement (of any process);
        returns how many were written. A bad line becomes a dead letter and replay goes
        on; any other failure (the database is still down) stops it and is raised.

        A file's lock is only ever held for a read or a rewrite, never across an await:
        an append (which takes the lock in this same thread) must never wait on a replay
        that waits on the database."""
        if not self.directory.exists():
            return 0
        written = 0
        for path in sorted(self.directory.glob("*.jsonl")):
            written += await self._replay_file(path, transactor)
        if written:
            log.warning("replayed %d spooled settlements", written)
        return written

    async def _replay_file(self, path: Path, transactor: Transactor) -> int:
        lines = _locked(path, lambda handle: _lines(handle.read()))
        replayed: set[bytes] = set()
        dead: dict[bytes, str] = {}
        try:
            for line in lines:
                try:
                    settlement = _decode(line)
                except Exception as exc:  # torn or not a settlement: it never will be
                    dead[line] = f"unreadable: {exc!r}"
                    continue
                try:
                    await settle(transactor, settlement, is_retry=True)
                except Exception as exc:
                    if not refused_for_good(exc):
                        raise  # the database is down: this line and the rest wait
                    dead[line] = f"refused: {exc!r}"
                    continue
                replayed.add(line)
        finally:
            if replayed or dead:
                rewrite = functools.partial(
                    _rewrite, replayed=replayed, dead=set(dead), dead_path=path.with_suffix(".dead")
                )
                for line in _locked(path, rewrite):
                    self._dead_letter(line, dead[line], path)
        # the emptied file stays: unlinking it could lose a line another process
        # appends between our unlock and the unlink
        return len(replayed)

    def _dead_letter(self, line: bytes, why: str, path: Path) -> None:
        log.error(
            "spooled settlement of message %s in %s cannot be written (%s); moved to %s",
            _message_id(line),
            path,
            why,
            path.with_suffix(".dead"),
        )
        if self._metrics is not None:
            self._metrics.outbox_dead_letters.inc()
