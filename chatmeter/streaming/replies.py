"""The replies this process is generating, and how a stop reaches them.

A stop for a reply held here cancels its task at once. A stop for a reply held by
another worker (or host) is a flag on its reservation row; each process polls for flags
on its own reservations, one query for all of them, and renews their leases in one
statement: housekeeping does not grow with the number of open streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from dataclasses import dataclass, field
from datetime import timedelta

from chatmeter.db.tables import utcnow
from chatmeter.db.transactor import Transactor
from chatmeter.metering.budget import flagged_stops, release_expired, renew_leases

log = logging.getLogger("chatmeter.replies")


@dataclass(eq=False, slots=True)
class ActiveReply:
    chat_id: uuid.UUID
    reservation_id: uuid.UUID
    task: asyncio.Task[object] | None = None
    stop_requested: bool = False
    timed_out: bool = False
    # the loop time the exchange began awaiting the provider, None between reads: only
    # while it awaits is a stop a cancellation; otherwise the exchange sees the flag
    # before its next read
    waiting_since: float | None = None

    def stop(self) -> None:
        """Stop the reply; its exchange ends the stream with finish_reason "stopped"."""
        if self.stop_requested:
            return
        self.stop_requested = True
        self._interrupt()

    def time_out(self) -> None:
        """The provider sent nothing in time; the exchange ends with PROVIDER_TIMEOUT."""
        self.timed_out = True
        self._interrupt()

    def _interrupt(self) -> None:
        if self.waiting_since is not None and self.task is not None:
            self.task.cancel()


@dataclass(slots=True)
class ReplyRegistry:
    transactor: Transactor
    worker_id: str
    lease_seconds: float
    poll_seconds: float = 0.5
    _replies: dict[uuid.UUID, ActiveReply] = field(default_factory=dict)

    def register(self, chat_id: uuid.UUID, reservation_id: uuid.UUID) -> ActiveReply:
        reply = ActiveReply(chat_id, reservation_id, asyncio.current_task())
        self._replies[chat_id] = reply
        return reply

    def unregister(self, reply: ActiveReply) -> None:
        if self._replies.get(reply.chat_id) is reply:
            del self._replies[reply.chat_id]

    def stop_local(self, chat_id: uuid.UUID) -> bool:
        reply = self._replies.get(chat_id)
        if reply is None:
            return False
        reply.stop()
        return True

    def __len__(self) -> int:
        return len(self._replies)

    async def run_watchdog(self, idle_seconds: float) -> None:
        """Time out the replies whose provider has sent nothing for `idle_seconds`: one
        timer for every open stream, where a timeout around each read would arm and
        cancel a timer per piece (a few percent of the CPU of an exchange)."""
        loop = asyncio.get_running_loop()
        every = min(max(idle_seconds / 10, 0.01), 1.0)
        while True:
            await asyncio.sleep(every)
            overdue = loop.time() - idle_seconds
            for reply in list(self._replies.values()):
                if reply.waiting_since is not None and reply.waiting_since <= overdue:
                    reply.time_out()

    async def run_housekeeping(self) -> None:
        """Poll stop flags, renew leases, release reservations of dead processes."""
        since_renewal = 0.0
        while True:
            await asyncio.sleep(self.poll_seconds)
            since_renewal += self.poll_seconds
            try:
                if self._replies:
                    await self._poll_stops()
                if since_renewal >= self.lease_seconds / 3:
                    since_renewal = 0.0
                    await self._renew_and_sweep()
            except Exception:
                log.exception("reply housekeeping failed; retrying")

    async def _poll_stops(self) -> None:
        for chat_id in await self.transactor.run(flagged_stops, self.worker_id):
            self.stop_local(chat_id)

    async def _renew_and_sweep(self) -> None:
        live = [reply.reservation_id for reply in self._replies.values()]
        now = utcnow()
        if live:
            # renewed first, so a late renewal never sweeps a live reply; two
            # transactions, as one would lock reservations rows before users' rows and
            # break the lock order (`budget.py`)
            expires_at = now + timedelta(seconds=self.lease_seconds)
            await self.transactor.run(renew_leases, live, expires_at)
        released = await self.transactor.run(release_expired, now)
        if released:
            log.warning("released %d reservations left by stopped processes", released)

    async def stop_all(self) -> None:
        for reply in list(self._replies.values()):
            with contextlib.suppress(Exception):
                reply.stop()
