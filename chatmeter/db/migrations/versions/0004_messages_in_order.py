"""a chat's messages indexed in the order the prompt reads them (issue 13)

The opening reads a chat's latest messages newest first, ties in time broken by role and
id (`streaming/opening.py`); the chat's page reads them oldest first, the reverse. Over
the index on (chat_id, created_at), PostgreSQL's generic plan for the opening's read
sorted every message of the chat: an opening cost more the longer its chat was (3.4 ms
of execution for a chat of some thousands of messages, against 0.2 ms). Scanned one way
or the other, this index gives either order with no sort, and the latest messages are
the first ones.

Revision ID: 0004_messages_in_order
Revises: 0003_api_keys
Create Date: 2026-12-01 21:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_messages_in_order"
down_revision = "0003_api_keys"
branch_labels = None
depends_on = None


# PostgreSQL builds and drops the indexes CONCURRENTLY, outside the migration's
# transaction: a large messages table stays writable while the index is built (a plain
# CREATE INDEX would hold every new message until it ended)


def upgrade() -> None:
    with op.get_context().autocommit_block():
        op.create_index(
            "ix_messages_in_order",
            "messages",
            ["chat_id", "created_at", sa.text("role DESC"), sa.text("message_id DESC")],
            postgresql_concurrently=True,
        )
        op.drop_index(
            "ix_messages_chat_id_created_at", table_name="messages", postgresql_concurrently=True
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.create_index(
            "ix_messages_chat_id_created_at",
            "messages",
            ["chat_id", "created_at"],
            postgresql_concurrently=True,
        )
        op.drop_index("ix_messages_in_order", table_name="messages", postgresql_concurrently=True)
