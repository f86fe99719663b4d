"""a user no admin assigned a plan follows CHATMETER_DEFAULT_PLAN (SPEC section 10)

Every user has the default plan "until an admin assigns another": the plan of a user's
row was the default's name written when the user was first seen, so changing
CHATMETER_DEFAULT_PLAN moved nobody. `plan` is now NULL for such users, read as the
default plan of the configuration running, and set only by an admin's assignment.

Rows whose plan is the default plan configured when this migration runs (`chatmeter db
upgrade` reads it; otherwise `default`) become NULL: they are the users on the default.
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
            "plan", existing_type=sa.String(length=64), nullable=True, server_default=None
        )
    op.execute(
        sa.text("UPDATE user_usage SET plan = NULL WHERE plan = :plan").bindparams(
            plan=_default_plan()
        )
    )


def downgrade() -> None:
    op.execute(
        sa.text("UPDATE user_usage SET plan = :plan WHERE plan IS NULL").bindparams(
            plan=_default_plan()
        )
    )
    with op.batch_alter_table("user_usage", schema=None) as batch_op:
        batch_op.alter_column(
            "plan", existing_type=sa.String(length=64), nullable=False, server_default="default"
        )
