"""plans: periods, spend, rate limits and the cost of each exchange (SPEC section 10)

Existing users move onto the built-in `default` plan and keep the token limit they had
(recorded as an override, so nothing they could do before changes).

Revision ID: 0002_plans
Revises: 0001
Create Date: 2026-12-02 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_plans"
down_revision = "0001"
branch_labels = None
depends_on = None

_ZERO = sa.text("0")


def upgrade() -> None:
    with op.batch_alter_table("user_usage", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("plan", sa.String(length=64), nullable=False, server_default="default")
        )
        batch_op.add_column(
            sa.Column(
                "token_limit_overridden", sa.Boolean(), nullable=False, server_default=sa.false()
            )
        )
        batch_op.add_column(
            sa.Column("period_start", sa.BigInteger(), nullable=False, server_default=_ZERO)
        )
        batch_op.add_column(
            sa.Column("spend_micros", sa.BigInteger(), nullable=False, server_default=_ZERO)
        )
        batch_op.add_column(
            sa.Column("reserved_micros", sa.BigInteger(), nullable=False, server_default=_ZERO)
        )
        batch_op.add_column(
            sa.Column("active_replies", sa.Integer(), nullable=False, server_default=_ZERO)
        )
        batch_op.add_column(
            sa.Column("rate_tat", sa.BigInteger(), nullable=False, server_default=_ZERO)
        )
    # the limits users have today are kept as theirs; replies in flight are counted
    op.execute(
        "UPDATE user_usage SET token_limit_overridden = true, active_replies = "
        "(SELECT count(*) FROM reservations WHERE reservations.user_id = user_usage.user_id)"
    )
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("cost_micros", sa.BigInteger(), nullable=False, server_default=_ZERO)
        )
    with op.batch_alter_table("usage_events", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("cost_micros", sa.BigInteger(), nullable=False, server_default=_ZERO)
        )
        batch_op.create_index(
            batch_op.f("ix_usage_events_created_at"), ["created_at"], unique=False
        )
    with op.batch_alter_table("reservations", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("micros", sa.BigInteger(), nullable=False, server_default=_ZERO)
        )


def downgrade() -> None:
    with op.batch_alter_table("reservations", schema=None) as batch_op:
        batch_op.drop_column("micros")
    with op.batch_alter_table("usage_events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_usage_events_created_at"))
        batch_op.drop_column("cost_micros")
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.drop_column("cost_micros")
    with op.batch_alter_table("user_usage", schema=None) as batch_op:
        for column in (
            "rate_tat",
            "active_replies",
            "reserved_micros",
            "spend_micros",
            "period_start",
            "token_limit_overridden",
            "plan",
        ):
            batch_op.drop_column(column)
