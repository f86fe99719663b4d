"""Prometheus metrics, in a registry of the app's own (no process-global state)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

if TYPE_CHECKING:
    from chatmeter.metering.settlement import Settlement

_REFUSAL_REASONS = {
    "TOKEN_BUDGET_EXCEEDED": "token",
    "SPEND_LIMIT_EXCEEDED": "spend",
    "RATE_LIMITED": "rate",
}


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.exchanges = Counter(
            "chatmeter_exchanges",
            "Exchanges by final status and metering source",
            ["status", "source"],
            registry=r,
        )
        self.tokens_billed = Counter(
            "chatmeter_tokens_billed", "Tokens billed to users", ["model", "kind"], registry=r
        )
        self.count_calls = Counter(
            "chatmeter_count_token_calls", "Texts sent to a count-tokens API", registry=r
        )
        self.count_cache_hits = Counter(
            "chatmeter_count_cache_hits", "Token counts served from the cache", registry=r
        )
        self.budget_refusals = Counter(
            "chatmeter_budget_refusals", "Exchanges refused for a spent budget", registry=r
        )
        self.refusals = Counter(
            "chatmeter_refusals",
            "Messages refused by a plan's limits, by reason (token, spend, rate)",
            ["reason"],
            registry=r,
        )
        self.cost_billed = Counter(
            "chatmeter_cost_billed_micros",
            "Money billed to users, in micro-units of the configured currency",
            ["model"],
            registry=r,
        )
        self.settle_failures = Counter(
            "chatmeter_settle_failures", "Settlement attempts that failed", registry=r
        )
        self.outbox_dead_letters = Counter(
            "chatmeter_outbox_dead_letters",
            "Spooled settlements that cannot be written (torn, or refused by the database), "
            "moved to the outbox's dead letters",
            registry=r,
        )
        self.active_streams = Gauge(
            "chatmeter_active_streams", "Replies being generated now", registry=r
        )

    def count_settled(self, s: Settlement) -> None:
        """An exchange written to the ledger: its outcome, tokens and cost."""
        self.exchanges.labels(s.status, s.source).inc()
        self.tokens_billed.labels(s.model, "total").inc(s.usage.total_tokens)
        self.cost_billed.labels(s.model).inc(s.cost_micros)

    def count_refusal(self, code: str) -> None:
        """A message refused before it streamed: by the plan's limits, or anything else
        (not counted here)."""
        reason = _REFUSAL_REASONS.get(code)
        if reason is None:
            return
        self.refusals.labels(reason).inc()
        if reason == "token":
            self.budget_refusals.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
