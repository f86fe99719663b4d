"""Another user's chat: every chat endpoint, and the stream, refuses with 403 FORBIDDEN,
and the refusal changes nothing. An admin is another user too: admin rights are for
/api/admin, not for reading people's chats."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import auth, make_settings, scripted
from tests.support.server import serve

OWNER = "owner-alice"
INTRUDERS = {"another user": auth("intruder-bob"), "an admin": auth("root", admin=True)}

# every endpoint with a chat in its path: (method, path after /api/chat/{id}, body)
CHAT_ENDPOINTS = [
    ("GET", "", None),
    ("PATCH", "", {"title": "Taken over"}),
    ("DELETE", "", None),
    ("POST", "/message", {"message": "Tell me what alice said"}),
    ("POST", "/stop", None),
]


@pytest.fixture
async def client(database_url: str, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    models = {
        "fast": scripted(reply="Alice's answer.", chunks=3),
        "slow": scripted(reply="A reply that takes a while. " * 4, chunks=20, delay_ms=40),
    }
    settings = make_settings(
        database_url, models=models, default_model="fast", outbox_dir=str(tmp_path / "outbox")
    )
    async with serve(settings) as running:
        async with httpx.AsyncClient(base_url=running.url, timeout=30) as http:
            yield http


async def owners_view(client: httpx.AsyncClient, chat_id: str) -> dict[str, Any]:
    response = await client.get(f"/api/chat/{chat_id}", headers=auth(OWNER))
    assert response.status_code == 200, response.text
    view: dict[str, Any] = response.json()
    return view


def assert_forbidden(response: httpx.Response, who: str) -> None:
    assert response.status_code == 403, (who, response.text)
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body == {"error": True, "code": "FORBIDDEN", "message": body["message"]}
    assert "alice" not in body["message"]


@pytest.mark.parametrize(
    ("method", "suffix", "body"),
    CHAT_ENDPOINTS,
    ids=[f"{m} {s or '/'}" for m, s, _ in CHAT_ENDPOINTS],
)
async def test_another_users_chat_is_forbidden(
    client: httpx.AsyncClient, method: str, suffix: str, body: Any
) -> None:
    created = await client.post("/api/chat", json={"title": "Alice's"}, headers=auth(OWNER))
    chat_id = created.json()["chat_id"]
    sent = await client.post(
        f"/api/chat/{chat_id}/message", json={"message": "my secret"}, headers=auth(OWNER)
    )
    assert sent.status_code == 200, sent.text
    before = await owners_view(client, chat_id)
    for who, headers in INTRUDERS.items():
        path = f"/api/chat/{chat_id}{suffix}"
        assert_forbidden(await client.request(method, path, json=body, headers=headers), who)
    # nothing changed: not the title, not the chat's life, not its messages
    assert await owners_view(client, chat_id) == before
    for headers in INTRUDERS.values():
        listed = (await client.get("/api/chat", headers=headers)).json()["chats"]
        assert chat_id not in [chat["chat_id"] for chat in listed]


async def test_a_live_stream_cannot_be_stopped_or_joined_by_another_user(
    client: httpx.AsyncClient,
) -> None:
    created = await client.post("/api/chat", json={"model": "slow"}, headers=auth(OWNER))
    chat_id = created.json()["chat_id"]
    events: list[dict[str, Any]] = []
    async with client.stream(
        "POST", f"/api/chat/{chat_id}/message", json={"message": "go"}, headers=auth(OWNER)
    ) as stream:
        lines = stream.aiter_lines()
        async for line in lines:
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
                break
        # the reply is being generated now: the intruder can neither stop nor join it
        for who, headers in INTRUDERS.items():
            stop = await client.post(f"/api/chat/{chat_id}/stop", headers=headers)
            assert_forbidden(stop, who)
            join = await client.post(
                f"/api/chat/{chat_id}/message", json={"message": "me too"}, headers=headers
            )
            assert_forbidden(join, who)
        async for line in lines:
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    assert events[-1]["done"] is True and events[-1]["finish_reason"] == "stop", events[-1]
    messages = (await owners_view(client, chat_id))["messages"]
    assert [(m["role"], m["status"]) for m in messages] == [
        ("user", "complete"),
        ("assistant", "complete"),
    ]
    for headers in INTRUDERS.values():
        theirs = (await client.get("/api/usage/events", headers=headers)).json()["events"]
        assert theirs == []
