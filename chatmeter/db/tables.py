"""The tables of SPEC section 7 (names from the seed), as SQLAlchemy Core.

Core, not the ORM: every statement on the message path is written out, so the number of
round trips per exchange is visible in the code.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
    }
)


class UtcDateTime(sa.TypeDecorator[datetime]):
    """Timestamps stored as UTC and always returned timezone-aware, on SQLite too."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


chats = sa.Table(
    "chats",
    metadata,
    sa.Column("chat_id", sa.Uuid, primary_key=True),
    sa.Column("user_id", sa.String(255), nullable=False),
    sa.Column("title", sa.String(200), nullable=False),
    sa.Column("model", sa.String(100), nullable=False),
    sa.Column("is_active", sa.Boolean, nullable=False, default=True),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("updated_at", UtcDateTime, nullable=False),
    sa.Index(None, "user_id", "is_active", "updated_at", "chat_id"),
)

messages = sa.Table(
    "messages",
    metadata,
    sa.Column("message_id", sa.Uuid, primary_key=True),
    sa.Column("chat_id", sa.Uuid, sa.ForeignKey("chats.chat_id"), nullable=False),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("content", sa.Text, nullable=False),
    sa.Column("tokens_consumed", sa.BigInteger, nullable=False, default=0),
    sa.Column("status", sa.String(16), nullable=False, default="complete"),
    sa.Column("prompt_tokens", sa.BigInteger, nullable=True),
    sa.Column("completion_tokens", sa.BigInteger, nullable=True),
    sa.Column("metering_source", sa.String(16), nullable=True),
    sa.Column("finish_reason", sa.String(32), nullable=True),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("cost_micros", sa.BigInteger, nullable=False, default=0, server_default="0"),
)
# a chat's messages oldest first, or newest first scanned backwards (the prompt's history:
# `streaming/opening.py`), with no sort either way (migration 0004)
sa.Index(
    "ix_messages_in_order",
    messages.c.chat_id,
    messages.c.created_at,
    messages.c.role.desc(),
    messages.c.message_id.desc(),
)

user_usage = sa.Table(
    "user_usage",
    metadata,
    sa.Column("user_id", sa.String(255), primary_key=True),
    sa.Column("total_tokens_used", sa.BigInteger, nullable=False, default=0),
    sa.Column("token_limit", sa.BigInteger, nullable=False),
    sa.Column("reserved_tokens", sa.BigInteger, nullable=False, default=0),
    sa.Column("updated_at", UtcDateTime, nullable=False),
    # SPEC section 10. The plan an admin assigned; '' (`plans.UNASSIGNED`, no plan's
    # name): the configured default plan, whichever it is now. Not NULL: the release
    # before read a NULL plan as a refused opening, and runs on this schema during a
    # rolling upgrade. `token_limit` is the plan's, unless an admin set one for this
    # user (`token_limit_overridden`) until a plan is assigned again.
    sa.Column("plan", sa.String(64), nullable=False, server_default=""),
    sa.Column("token_limit_overridden", sa.Boolean, nullable=False, server_default=sa.false()),
    # the start of the period the totals belong to (they are the sums of the user's ledger
    # rows since), in Unix microseconds; the reservation rolls it over when it is not the
    # plan's current period's (`budget.roll_over`)
    sa.Column("period_start", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("spend_micros", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("reserved_micros", sa.BigInteger, nullable=False, server_default="0"),
    # the user's reservations (replies streaming now), for `concurrent_replies`
    sa.Column("active_replies", sa.Integer, nullable=False, server_default="0"),
    # requests_per_minute as GCRA: the theoretical arrival time, Unix microseconds
    sa.Column("rate_tat", sa.BigInteger, nullable=False, server_default="0"),
)

usage_events = sa.Table(
    "usage_events",
    metadata,
    sa.Column("event_id", sa.Uuid, primary_key=True),
    sa.Column("user_id", sa.String(255), nullable=False),
    # null for an exchange of the OpenAI-compatible endpoint: it belongs to no chat
    sa.Column("chat_id", sa.Uuid, nullable=True),
    # unique: an exchange is billed once, whatever retries or replays happen
    sa.Column("message_id", sa.Uuid, nullable=False, unique=True),
    sa.Column("model", sa.String(100), nullable=False),
    sa.Column("prompt_tokens", sa.BigInteger, nullable=False),
    sa.Column("completion_tokens", sa.BigInteger, nullable=False),
    sa.Column("thinking_tokens", sa.BigInteger, nullable=False),
    sa.Column("cached_tokens", sa.BigInteger, nullable=False),
    sa.Column("total_tokens", sa.BigInteger, nullable=False),
    sa.Column("source", sa.String(16), nullable=False),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("cost_micros", sa.BigInteger, nullable=False, default=0, server_default="0"),
    sa.Index(None, "user_id", "created_at"),
    sa.Index(None, "created_at"),
)

# One row per reply being generated: the budget it holds, the 409 rule (one per chat,
# across every worker) and the stop flag. A row whose lease expired belonged to a process
# that died; it is released by the sweeper. An exchange without a chat (the
# OpenAI-compatible endpoint) has a null chat_id: unique ignores nulls, so it claims none.
reservations = sa.Table(
    "reservations",
    metadata,
    sa.Column("reservation_id", sa.Uuid, primary_key=True),
    sa.Column("user_id", sa.String(255), nullable=False),
    sa.Column("chat_id", sa.Uuid, nullable=True, unique=True),
    sa.Column("tokens", sa.BigInteger, nullable=False),
    sa.Column("worker_id", sa.String(64), nullable=False),
    sa.Column("stop_requested", sa.Boolean, nullable=False, default=False),
    sa.Column("expires_at", UtcDateTime, nullable=False),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("micros", sa.BigInteger, nullable=False, server_default="0"),  # money held
    sa.Index(None, "expires_at"),
)

# API keys (SPEC section 12): only an HMAC-SHA256 digest of the secret is kept, looked up
# by its unique index on every request, so a revoked key fails at once on every worker.
api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("key_id", sa.Uuid, primary_key=True),
    sa.Column("user_id", sa.String(255), nullable=False),
    sa.Column("name", sa.String(100), nullable=False),
    sa.Column("key_digest", sa.String(64), nullable=False, unique=True),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("last_used_at", UtcDateTime, nullable=True),
    sa.Column("revoked_at", UtcDateTime, nullable=True),
    sa.Index(None, "user_id", "created_at"),
)
