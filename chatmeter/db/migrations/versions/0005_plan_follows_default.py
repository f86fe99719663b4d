"""a user no admin assigned a plan follows CHATMETER_DEFAULT_PLAN (SPEC section 10)

Every user has the default plan "until an admin assigns another": the plan of a user's
row was the default's name written when the user was first seen, so changing
CHATMETER_DEFAULT_PLAN moved nobody. `plan` is now '' for such users (no plan's name),
read as the default plan of the configuration running, and set only by an admin's
assignment. Not NULL: during a rolling upgrade the release before runs on this schema,
and it reads '' as a plan no longer configured (the default), where its one-statement
opening on PostgreSQL read NULL as refused, after it had committed.

Rows whose plan is the default plan configured when this migration runs (`chatmeter db
upgrade` reads it; otherwise `default`) become '': they are the users on the default.
A user an admin put on that same plan cannot be told apart from them, and follows the
default too from now on.

Revision ID: 0005_plan_follows_default
Revises: 0004_messages_in_order
Create Date: 2026-12-02 14:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

revision = "0005_plan_follows_default"
down_revision = "0004_messages_in_order"
branch_labels = None
depends_on = None


def _default_plan() -> str:
    return str(context.config.attributes.get("default_plan", "default"))


def upgrade() -> None:
    with op.batch_alter_table("user_usage", schema=None) as batch_op:
        batch_op.alter_column(
            "plan", existing_type=sa.String(length=64), existing_nullable=False, server_default=""
        )
    op.execute(
        sa.text("UPDATE user_usage SET plan = '' WHERE plan = :plan").bindparams(
            plan=_default_plan()
        )
    )


def downgrade() -> None:
    # NULL too: a database migrated by this revision's first version (commit 26cb25b) has
    # NULL for an unassigned plan
    op.execute(
        sa.text("UPDATE user_usage SET plan = :plan WHERE plan = '' OR plan IS NULL").bindparams(
            plan=_default_plan()
        )
    )
    with op.batch_alter_table("user_usage", schema=None) as batch_op:
        batch_op.alter_column(
            "plan", existing_type=sa.String(length=64), nullable=False, server_default="default"
        )
