"""Making, listing and revoking API keys (the API and the CLI share these)."""

from __future__ import annotations

import uuid
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from chatmeter.auth.keys import KeyDigester, new_key
from chatmeter.db.tables import api_keys, utcnow
from chatmeter.errors import ApiError
from chatmeter.ids import new_id

# live keys one user may hold: enough for every app and environment, and a bound on rows
MAX_KEYS_PER_USER = 100


def key_json(row: Any) -> dict[str, Any]:
    """A key as listed: never its secret, nor its digest."""
    return {
        "key_id": str(row.key_id),
        "name": row.name,
        "created_at": row.created_at.isoformat(),
        "last_used_at": row.last_used_at.isoformat() if row.last_used_at else None,
    }


def _live(user_id: str) -> sa.ColumnElement[bool]:
    return sa.and_(api_keys.c.user_id == user_id, api_keys.c.revoked_at.is_(None))


async def create_key(
    conn: AsyncConnection, digester: KeyDigester, user_id: str, name: str
) -> dict[str, Any]:
    """A new key for `user_id`: the only time its secret is seen. Run it in a write
    transaction (the count and the insert together hold MAX_KEYS_PER_USER)."""
    held = (
        await conn.execute(sa.select(sa.func.count()).select_from(api_keys).where(_live(user_id)))
    ).scalar_one()
    if held >= MAX_KEYS_PER_USER:
        raise ApiError(
            409, "TOO_MANY_KEYS", f"A user may hold {MAX_KEYS_PER_USER} keys: revoke one first."
        )
    key, key_id, now = new_key(), new_id(), utcnow()
    await conn.execute(
        api_keys.insert().values(
            key_id=key_id,
            user_id=user_id,
            name=name,
            key_digest=digester.digest(key),
            created_at=now,
        )
    )
    return {"key_id": str(key_id), "name": name, "key": key, "created_at": now.isoformat()}


async def list_keys(conn: AsyncConnection, user_id: str) -> list[dict[str, Any]]:
    """The user's live keys, newest first."""
    query = (
        sa.select(api_keys)
        .where(_live(user_id))
        .order_by(api_keys.c.created_at.desc(), api_keys.c.key_id.desc())
    )
    return [key_json(row) for row in (await conn.execute(query)).all()]


async def revoke_key(conn: AsyncConnection, user_id: str, key_id: uuid.UUID) -> bool:
    """Revoke one of the user's live keys; False if the user holds no such key. The row
    stays (revoked_at set) so the key's history is kept; it never authenticates again."""
    result = await conn.execute(
        api_keys.update()
        .where(_live(user_id), api_keys.c.key_id == key_id)
        .values(revoked_at=utcnow())
        .returning(api_keys.c.key_id)
    )
    return result.first() is not None
