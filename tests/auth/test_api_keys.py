"""API keys (SPEC section 12): made once, stored only as a keyed digest, acting as their
user on `/api` (the message route too), revoked at once."""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from datetime import datetime
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from chatmeter.auth.key_store import MAX_KEYS_PER_USER
from chatmeter.auth.keys import KeyDigester, key_digest_secret, key_owner_steps
from chatmeter.db.steps import Sql, Steps
from chatmeter.db.tables import api_keys, utcnow
from tests.conftest import auth, make_settings
from tests.streaming.test_exchange import new_chat
from tests.support.server import RunningServer
from tests.support.sse import stream_message


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def make_key(client: httpx.AsyncClient, user: str, name: str = "laptop") -> dict[str, str]:
    response = await client.post("/api/keys", json={"name": name}, headers=auth(user))
    assert response.status_code == 201, response.text
    body: dict[str, str] = response.json()
    return body


async def test_a_key_is_shown_once_and_stored_only_as_a_digest(
    client: httpx.AsyncClient, server: RunningServer
) -> None:
    created = await make_key(client, "kim", "  ci runner ")
    assert set(created) == {"key_id", "name", "key", "created_at"}
    assert created["name"] == "ci runner"
    assert re.fullmatch(r"cm-[A-Za-z0-9_-]{43}", created["key"])  # 256 random bits
    uuid.UUID(created["key_id"])
    async with server.engine.connect() as conn:
        rows = (await conn.execute(sa.select(api_keys))).mappings().all()
    assert len(rows) == 1
    stored = rows[0]
    assert created["key"] not in {str(value) for value in stored.values()}
    secret = key_digest_secret(server.services.settings)
    assert stored["key_digest"] == KeyDigester(secret).digest(created["key"])
    listed = await client.get("/api/keys", headers=auth("kim"))
    assert listed.status_code == 200
    (entry,) = listed.json()["keys"]
    assert entry == {
        "key_id": created["key_id"],
        "name": "ci runner",
        "created_at": created["created_at"],
        "last_used_at": None,
    }
    assert created["key"] not in listed.text


async def test_a_key_acts_as_its_user_on_the_api_and_the_message_route(
    client: httpx.AsyncClient, server: RunningServer
) -> None:
    key = (await make_key(client, "lee"))["key"]
    chat = await client.post("/api/chat", json={"title": "by key"}, headers=bearer(key))
    assert chat.status_code == 201
    chat_id = chat.json()["chat_id"]
    # the JWT of the same user sees the chat the key made
    assert (await client.get(f"/api/chat/{chat_id}", headers=auth("lee"))).status_code == 200
    assert (await client.get(f"/api/chat/{chat_id}", headers=auth("other"))).status_code == 403
    result = await stream_message(client, chat_id, "hello", key)
    assert result.status == 200
    assert result.last["done"] is True
    usage = (await client.get("/api/usage", headers=bearer(key))).json()
    assert usage["user_id"] == "lee"
    assert usage["total_tokens_used"] == result.last["tokens_used"]
    (entry,) = (await client.get("/api/keys", headers=bearer(key))).json()["keys"]
    assert entry["last_used_at"] is not None


async def test_a_revoked_key_stops_working_at_once(
    client: httpx.AsyncClient, server: RunningServer
) -> None:
    created = await make_key(client, "max")
    key = created["key"]
    chat_id = await new_chat(client, "max")
    assert (await client.get("/api/chat", headers=bearer(key))).status_code == 200
    gone = await client.delete(f"/api/keys/{created['key_id']}", headers=auth("max"))
    assert gone.status_code == 204
    for request in (
        client.get("/api/chat", headers=bearer(key)),
        client.post("/api/keys", json={"name": "x"}, headers=bearer(key)),
    ):
        refused = await request
        assert refused.status_code == 401
        assert refused.json()["code"] == "UNAUTHORIZED"
    streamed = await stream_message(client, chat_id, "hi", key)
    assert streamed.status == 401
    assert (await client.get("/api/keys", headers=auth("max"))).json() == {"keys": []}
    again = await client.delete(f"/api/keys/{created['key_id']}", headers=auth("max"))
    assert again.status_code == 404
    assert again.json()["code"] == "KEY_NOT_FOUND"


async def test_keys_are_private_to_their_user(
    client: httpx.AsyncClient, server: RunningServer
) -> None:
    created = await make_key(client, "nia")
    assert (await client.get("/api/keys", headers=auth("oz"))).json() == {"keys": []}
    stolen = await client.delete(f"/api/keys/{created['key_id']}", headers=auth("oz"))
    assert stolen.status_code == 404
    assert (await client.get("/api/chat", headers=bearer(created["key"]))).status_code == 200


async def test_a_key_is_no_admin(client: httpx.AsyncClient, server: RunningServer) -> None:
    """Admin rights come from the identity provider's claims, which a key cannot re-check."""
    key = (await make_key(client, "root", "admin's key"))["key"]
    refused = await client.get("/api/admin/users/root/usage", headers=bearer(key))
    assert refused.status_code == 403
    allowed = await client.get("/api/admin/users/root/usage", headers=auth("root", admin=True))
    assert allowed.status_code == 200


async def test_bad_keys_and_bad_requests(client: httpx.AsyncClient, server: RunningServer) -> None:
    key = (await make_key(client, "pat"))["key"]
    for wrong in (key[:-1] + ("A" if key[-1] != "A" else "B"), key + "x", "cm-", "cm-" + "!" * 43):
        response = await client.get("/api/chat", headers=bearer(wrong))
        assert response.status_code == 401, wrong
    bodies: list[object] = [{}, {"name": ""}, {"name": "   "}, {"name": 5}, {"name": "x" * 101}, []]
    for body in bodies:
        response = await client.post("/api/keys", json=body, headers=auth("pat"))
        assert response.status_code == 400, body
        assert response.json()["code"] == "INVALID_REQUEST"
    bad_id = await client.delete("/api/keys/not-a-uuid", headers=auth("pat"))
    assert bad_id.status_code == 400
    assert (await client.post("/api/keys", json={"name": "x"})).status_code == 401


async def test_keys_made_at_once_never_pass_the_limit(
    client: httpx.AsyncClient, server: RunningServer
) -> None:
    # each create counts the user's live keys and inserts in one transaction; on
    # PostgreSQL, under READ COMMITTED, concurrent ones each counted 95 and all inserted
    for _ in range(MAX_KEYS_PER_USER - 5):
        await make_key(client, "kim")
    made = await asyncio.gather(
        *(client.post("/api/keys", json={"name": "k"}, headers=auth("kim")) for _ in range(20))
    )
    assert sorted(r.status_code for r in made) == [201] * 5 + [409] * 15
    assert {r.json()["code"] for r in made if r.status_code == 409} == {"TOO_MANY_KEYS"}
    listed = await client.get("/api/keys", headers=auth("kim"))
    assert len(listed.json()["keys"]) == MAX_KEYS_PER_USER


async def test_last_used_is_written_at_most_once_a_minute(
    client: httpx.AsyncClient, server: RunningServer
) -> None:
    """Using a key reads its row; it writes `last_used_at` only when a minute old."""
    created = await make_key(client, "quin")
    digest = server.services.key_digester.digest(created["key"])
    transactor = server.services.transactor
    now = utcnow()
    assert await transactor.run(key_owner_steps, digest, now) == ("quin", digest)

    def last_used(key_id: uuid.UUID) -> Steps[datetime | None]:
        rows = yield Sql("SELECT last_used_at FROM api_keys WHERE key_id = :id", {"id": key_id})
        used: datetime | None = rows[0][0]
        return used

    key_id = uuid.UUID(created["key_id"])
    first = await transactor.run(last_used, key_id)
    await transactor.run(key_owner_steps, digest, utcnow())
    assert await transactor.run(last_used, key_id) == first
    later = now.replace(year=now.year + 1)
    await transactor.run(key_owner_steps, digest, later)
    assert await transactor.run(last_used, key_id) != first


def test_the_digest_secret_is_the_configured_one_or_derived(tmp_path: object) -> None:
    base = make_settings("sqlite+aiosqlite:///unused.db")
    own = make_settings("sqlite+aiosqlite:///unused.db", api_key_secret="k" * 32)
    assert key_digest_secret(base) != key_digest_secret(own)
    assert key_digest_secret(base) == key_digest_secret(base)
    # derived, never the JWT secret itself
    assert key_digest_secret(base) != (base.jwt_secret or "").encode()


def test_keys_on_a_hosts_own_secret_are_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Tokens from an identity provider (JWKS alone) and no CHATMETER_API_KEY_SECRET:
    key digests come from this host's development secret file, so keys break on another
    host or when the file is lost (a container's): start-up says so."""
    jwks_only = make_settings(
        "sqlite+aiosqlite:///unused.db",
        jwt_secret=None,
        jwt_jwks_url="https://idp.example/.well-known/jwks.json",
        dev_secret_file=str(tmp_path / "dev-secret"),
    )
    with caplog.at_level(logging.WARNING, logger="chatmeter.auth"):
        key_digest_secret(jwks_only)
    assert "CHATMETER_API_KEY_SECRET" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="chatmeter.auth"):
        key_digest_secret(jwks_only.model_copy(update={"api_key_secret": "k" * 32}))
        key_digest_secret(make_settings("sqlite+aiosqlite:///unused.db"))
    assert caplog.text == ""
