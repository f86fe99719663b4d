"""Everything a request needs, made once in the app's lifespan (no module-level state)."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from chatmeter.auth.keys import KeyDigester, key_digest_secret
from chatmeter.auth.tokens import TokenVerifier
from chatmeter.config import Settings, dev_jwt_secret
from chatmeter.db.transactor import Transactor, make_transactor
from chatmeter.metering.counting import TokenCounter
from chatmeter.metering.outbox import Outbox
from chatmeter.metering.plans import PlanBook
from chatmeter.observability.metrics import Metrics
from chatmeter.providers.factories import default_factories
from chatmeter.providers.registry import ProviderRegistry
from chatmeter.streaming.log import MemoryLog, ReplyLog
from chatmeter.streaming.opening import OpeningRules
from chatmeter.streaming.orphans import OrphanSettler
from chatmeter.streaming.redis_log import RedisLog, RedisSignals, connect
from chatmeter.streaming.replies import ReplyRegistry
from chatmeter.streaming.signals import PollOnly, PostgresSignals, StopSignals

log = logging.getLogger("chatmeter")


@dataclass(slots=True)
class Services:
    settings: Settings
    transactor: Transactor
    verifier: TokenVerifier
    key_digester: KeyDigester
    providers: ProviderRegistry
    counter: TokenCounter
    metrics: Metrics
    replies: ReplyRegistry
    reply_log: ReplyLog
    stop_signals: StopSignals
    outbox: Outbox
    worker_id: str
    opening_rules: OpeningRules
    _background: set[asyncio.Task[Any]] = field(default_factory=set)

    @property
    def plans(self) -> PlanBook:
        return self.opening_rules.plans

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run `coro` to completion even if the request that started it goes away;
        shutdown waits for it."""
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def aclose(self) -> None:
        # the replies still generating end now, each saved, billed and released (a
        # deploy must not leave a chat answering 409 until a lease runs out)
        self.replies.stop_every("interrupted")
        for task in list(self._background):
            if task.get_name().startswith("housekeeping"):
                task.cancel()
        # settlements may be spawned while we wait (a cancelled stream closes its
        # provider first): wait until none is left, within a bound
        deadline = asyncio.get_running_loop().time() + 30
        while pending := [t for t in self._background if not t.done()]:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            await asyncio.wait(pending, timeout=remaining)
            await asyncio.sleep(0)
        await self.reply_log.aclose()
        await self.providers.aclose()
        await self.transactor.close()


def new_worker_id() -> str:
    return f"{socket.gethostname()[:32]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


# the modules of the transactions this application runs (the SQLite writer process
# imports them as it starts)
TRANSACTION_MODULES = (
    "chatmeter.streaming.opening",
    "chatmeter.metering.settlement",
    "chatmeter.auth.keys",
    "chatmeter.auth.key_store",
    "chatmeter.chats.store",
    "chatmeter.metering.accounts",
    "chatmeter.metering.summary",
    "chatmeter.db.health",
)


async def start_services(settings: Settings) -> Services:
    metrics = Metrics()
    worker_id = new_worker_id()
    secret = dev_jwt_secret(settings) if not settings.jwt_jwks_url else settings.jwt_secret
    reply_log, stop_signals = _reply_sharing(settings)
    shared = reply_log if isinstance(reply_log, RedisLog) else None
    # a reply whose process dies mid-reply is settled from its log in Redis
    opening_rules = OpeningRules.of(settings, worker_id, settles_orphans=shared is not None)
    transactor = make_transactor(
        settings.database_url,
        settings.sqlite_busy_timeout_ms,
        sqlite_trace_file=settings.sqlite_trace_file,
        preload=TRANSACTION_MODULES,
        # every opening takes the rules and every settlement the plans
        constants=(opening_rules, opening_rules.plans),
    )
    services = Services(
        settings=settings,
        transactor=transactor,
        verifier=TokenVerifier(
            secret=secret,
            jwks_url=settings.jwt_jwks_url,
            audience=settings.jwt_audience,
            issuer=settings.jwt_issuer,
            algorithms=settings.jwt_algorithms,
        ),
        key_digester=KeyDigester(key_digest_secret(settings)),
        providers=ProviderRegistry(settings, default_factories()),
        counter=TokenCounter(metrics, settings.count_cache_size),
        metrics=metrics,
        replies=ReplyRegistry(transactor, worker_id, settings.reservation_ttl_seconds),
        reply_log=reply_log,
        stop_signals=stop_signals,
        outbox=Outbox(settings.outbox_dir, worker_id, metrics),
        worker_id=worker_id,
        opening_rules=opening_rules,
    )
    if shared is not None:
        services.replies.orphans = OrphanSettler(
            transactor,
            shared,
            services.counter,
            services.providers,
            settings,
            metrics,
        )
    await transactor.start()
    # the default model is started now, not on the first message: the embedded model
    # takes a few seconds to load, and a misconfigured provider stops start-up here
    await services.providers.get(settings.default_model)
    services.spawn(services.replies.run_housekeeping()).set_name("housekeeping:replies")
    services.spawn(services.replies.run_watchdog(settings.provider_idle_timeout_seconds)).set_name(
        "housekeeping:watchdog"
    )
    replay = services.outbox.run(transactor, 1.0)
    services.spawn(replay).set_name("housekeeping:outbox")
    services.spawn(
        services.stop_signals.run(services.replies.stop_local, services.replies.poll_stops)
    ).set_name("housekeeping:signals")
    return services


def _reply_sharing(settings: Settings) -> tuple[ReplyLog, StopSignals]:
    """Where replies are kept and how stops travel: Redis when configured (any worker,
    any host); else this process's memory, and PostgreSQL notifications (or, on SQLite,
    the poll alone)."""
    memory = MemoryLog(settings.replay_seconds, settings.replay_max_bytes)
    if settings.redis_url:
        client = connect(settings.redis_url)
        shared = RedisLog(client, memory, settings.replay_seconds, settings.reservation_ttl_seconds)
        return shared, RedisSignals(client)
    if settings.is_sqlite:
        return memory, PollOnly()
    return memory, PostgresSignals(settings.database_url.replace("+asyncpg", "", 1))
