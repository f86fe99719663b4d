"""API keys; exchanges without a chat (the OpenAI-compatible endpoint)

Revision ID: 0003_api_keys
Revises: 0001
Create Date: 2026-12-02 10:00:00
"""

from __future__ import annotations

import uuid

import sqlalchemy as sa
from alembic import op

revision = "0003_api_keys"
down_revision = "0002_plans"
branch_labels = None
depends_on = None

# what a chat-less ledger row becomes on downgrade: the old schema has no null chat_id,
# and dropping the row would break "total_tokens_used equals the sum of the ledger"
NO_CHAT = uuid.UUID(int=0)


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("key_id", sa.Uuid(), nullable=False),
        sa.Column("user_id", sa.String(length=255), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("key_digest", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("key_id", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("key_digest", name=op.f("uq_api_keys_key_digest")),
    )
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_api_keys_user_id_created_at"), ["user_id", "created_at"], unique=False
        )
    with op.batch_alter_table("usage_events", schema=None) as batch_op:
        batch_op.alter_column("chat_id", existing_type=sa.Uuid(), nullable=True)
    with op.batch_alter_table("reservations", schema=None) as batch_op:
        batch_op.alter_column("chat_id", existing_type=sa.Uuid(), nullable=True)


def downgrade() -> None:
    reservations = sa.table("reservations", sa.column("chat_id", sa.Uuid()))
    usage_events = sa.table("usage_events", sa.column("chat_id", sa.Uuid()))
    # a chat-less reply in flight: released now, what it held handed back (its tokens, its
    # money and its place among the user's concurrent replies, as `reservations._release`)
    chatless = (
        "FROM reservations WHERE reservations.user_id = user_usage.user_id "
        "AND reservations.chat_id IS NULL)"
    )
    op.execute(
        f"UPDATE user_usage SET reserved_tokens = reserved_tokens - (SELECT "
        f"COALESCE(SUM(tokens), 0) {chatless}, reserved_micros = reserved_micros - (SELECT "
        f"COALESCE(SUM(micros), 0) {chatless}, active_replies = active_replies - (SELECT "
        f"COUNT(*) {chatless}"
    )
    op.execute(reservations.delete().where(reservations.c.chat_id.is_(None)))
    op.execute(
        usage_events.update().where(usage_events.c.chat_id.is_(None)).values(chat_id=NO_CHAT)
    )
    with op.batch_alter_table("reservations", schema=None) as batch_op:
        batch_op.alter_column("chat_id", existing_type=sa.Uuid(), nullable=False)
    with op.batch_alter_table("usage_events", schema=None) as batch_op:
        batch_op.alter_column("chat_id", existing_type=sa.Uuid(), nullable=False)
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_api_keys_user_id_created_at"))
    op.drop_table("api_keys")
