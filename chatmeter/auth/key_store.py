"""Making, listing and revoking API keys, as transaction steps (the API and the CLI
share these)."""

from __future__ import annotations

import uuid
from typing import Any

from chatmeter.auth.keys import KeyDigester, new_key
from chatmeter.db.rows import as_datetime, as_optional_datetime
from chatmeter.db.steps import Sql, Steps
from chatmeter.db.tables import utcnow
from chatmeter.errors import ApiError
from chatmeter.ids import as_uuid, new_id

# live keys one user may hold: enough for every app and environment, and a bound on rows
MAX_KEYS_PER_USER = 100
_LIVE = "user_id = :user_id AND revoked_at IS NULL"


def key_json(row: tuple[Any, ...]) -> dict[str, Any]:
    """A key as listed (`key_id, name, created_at, last_used_at`): never its secret, nor
    its digest."""
    key_id, name, created_at, last_used_at = row
    last_used = as_optional_datetime(last_used_at)
    return {
        "key_id": str(as_uuid(key_id)),
        "name": name,
        "created_at": as_datetime(created_at).isoformat(),
        "last_used_at": last_used.isoformat() if last_used else None,
    }


def create_key(digester: KeyDigester, user_id: str, name: str) -> Steps[dict[str, Any]]:
    """A new key for `user_id`: the only time its secret is seen. The count and the
    insert are one transaction: together they hold MAX_KEYS_PER_USER."""
    # PostgreSQL (READ COMMITTED): lock the user's live keys with a write that changes
    # nothing, so a concurrent create waits here and then counts the key it made; two
    # plain counts both saw room and both inserted. SQLite has one writer at a time
    yield Sql(f"UPDATE api_keys SET revoked_at = revoked_at WHERE {_LIVE}", {"user_id": user_id})
    counted = yield Sql(f"SELECT COUNT(*) FROM api_keys WHERE {_LIVE}", {"user_id": user_id})
    if counted[0][0] >= MAX_KEYS_PER_USER:
        raise ApiError(
            409, "TOO_MANY_KEYS", f"A user may hold {MAX_KEYS_PER_USER} keys: revoke one first."
        )
    key, key_id, now = new_key(), new_id(), utcnow()
    yield Sql(
        "INSERT INTO api_keys (key_id, user_id, name, key_digest, created_at) "
        "VALUES (:key_id, :user_id, :name, :digest, :now)",
        {
            "key_id": key_id,
            "user_id": user_id,
            "name": name,
            "digest": digester.digest(key),
            "now": now,
        },
    )
    return {"key_id": str(key_id), "name": name, "key": key, "created_at": now.isoformat()}


def list_keys(user_id: str) -> Steps[list[dict[str, Any]]]:
    """The user's live keys, newest first."""
    rows = yield Sql(
        f"SELECT key_id, name, created_at, last_used_at FROM api_keys WHERE {_LIVE} "
        "ORDER BY created_at DESC, key_id DESC",
        {"user_id": user_id},
        alone=True,
    )
    return [key_json(row) for row in rows]


def revoke_key(user_id: str, key_id: uuid.UUID) -> Steps[bool]:
    """Revoke one of the user's live keys; False if the user holds no such key. The row
    stays (revoked_at set) so the key's history is kept; it never authenticates again."""
    rows = yield Sql(
        f"UPDATE api_keys SET revoked_at = :now WHERE {_LIVE} AND key_id = :key_id "
        "RETURNING key_id",
        {"now": utcnow(), "user_id": user_id, "key_id": key_id},
    )
    return bool(rows)
