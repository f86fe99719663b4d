"""The chat endpoints over real HTTP (SPEC section 4), on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from chatmeter.db.tables import chats, messages
from tests.conftest import auth, make_settings, token_for
from tests.support.server import RunningServer, serve
from tests.support.shared_server import fresh, shared_server_fixtures
from tests.support.sse import stream_message

backend, server, client = shared_server_fixtures()

UNKNOWN_CHAT = "00000000-0000-4000-8000-000000000000"


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body: dict[str, Any] = response.json()
    assert set(body) == {"error", "code", "message"}, body
    assert body["error"] is True
    assert body["code"] == code, body
    assert isinstance(body["message"], str) and body["message"].strip()
    return body


def parse_time(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    assert moment.tzinfo is not None, text
    return moment


async def create(client: httpx.AsyncClient, user: str, body: Any = None) -> dict[str, Any]:
    response = await client.post("/api/chat", json={} if body is None else body, headers=auth(user))
    assert response.status_code == 201, response.text
    chat: dict[str, Any] = response.json()
    return chat


async def chat_row(server: RunningServer, chat_id: str) -> Any:
    async with server.engine.connect() as conn:
        query = sa.select(chats).where(chats.c.chat_id == uuid.UUID(chat_id))
        return (await conn.execute(query)).one_or_none()


async def insert_messages(
    server: RunningServer, chat_id: str, rows: list[tuple[str, str, str]], start: datetime
) -> list[str]:
    """Messages (role, content, status) one second apart from `start`, inserted in a
    shuffled order so that only `created_at` can put them in order."""
    values = [
        {
            "message_id": uuid.uuid4(),
            "chat_id": uuid.UUID(chat_id),
            "role": role,
            "content": content,
            "tokens_consumed": 0 if role == "user" else 10 + n,
            "status": status,
            "prompt_tokens": None if role == "user" else 5,
            "completion_tokens": None if role == "user" else 5 + n,
            "metering_source": None if role == "user" else "provider",
            "finish_reason": None if role == "user" else "stop",
            "created_at": start + timedelta(seconds=n),
        }
        for n, (role, content, status) in enumerate(rows)
    ]
    shuffled = values[1::2] + values[::2]
    async with server.engine.begin() as conn:
        await conn.execute(messages.insert(), shuffled)
    return [str(v["message_id"]) for v in values]


# -- create ---------------------------------------------------------------------------


async def test_create_with_defaults(client: httpx.AsyncClient, server: RunningServer) -> None:
    alice = fresh("alice")
    before = datetime.now(UTC)
    response = await client.post("/api/chat", json={}, headers=auth(alice))
    assert response.status_code == 201, response.text
    assert response.headers["content-type"] == "application/json"
    chat = response.json()
    assert set(chat) == {"chat_id", "title", "model", "is_active", "created_at", "updated_at"}
    assert str(uuid.UUID(chat["chat_id"])) == chat["chat_id"]
    assert chat["title"] == "New chat"
    assert chat["model"] == "scripted"  # the default_model of the test settings
    assert chat["is_active"] is True
    created = parse_time(chat["created_at"])
    assert chat["updated_at"] == chat["created_at"]
    assert before - timedelta(seconds=1) <= created <= datetime.now(UTC) + timedelta(seconds=1)

    row = await chat_row(server, chat["chat_id"])
    assert row is not None
    assert (row.user_id, row.title, row.model, row.is_active) == (
        alice,
        "New chat",
        "scripted",
        True,
    )


async def test_create_without_a_body(client: httpx.AsyncClient) -> None:
    alice = fresh("alice")
    response = await client.post("/api/chat", headers=auth(alice))
    assert response.status_code == 201, response.text
    assert (response.json()["title"], response.json()["model"]) == ("New chat", "scripted")


async def test_default_model_comes_from_settings(database_url: str) -> None:
    alice = fresh("alice")
    settings = make_settings(database_url, default_model="local")
    async with serve(settings) as running, httpx.AsyncClient(base_url=running.url) as client:
        chat = await create(client, alice)
    assert chat["model"] == "local"


async def test_create_with_title_and_model(
    client: httpx.AsyncClient, server: RunningServer
) -> None:
    alice = fresh("alice")
    chat = await create(client, alice, {"title": "  Trip to Lisbon  ", "model": "local"})
    assert chat["title"] == "Trip to Lisbon"
    assert chat["model"] == "local"  # the built-in model always exists
    row = await chat_row(server, chat["chat_id"])
    assert (row.title, row.model) == ("Trip to Lisbon", "local")
    exactly_200 = await create(client, alice, {"title": "t" * 200, "model": None})
    assert exactly_200["title"] == "t" * 200
    assert exactly_200["model"] == "scripted"
    unicode = await create(client, alice, {"title": "Café ☕ 日本"})
    assert unicode["title"] == "Café ☕ 日本"


async def test_unknown_model_is_400(client: httpx.AsyncClient, server: RunningServer) -> None:
    alice = fresh("alice")
    body = assert_error(
        await client.post("/api/chat", json={"model": "gpt-17"}, headers=auth(alice)),
        400,
        "INVALID_REQUEST",
    )
    assert "gpt-17" in body["message"]
    await assert_no_chats(server, alice)


@pytest.mark.parametrize(
    "body",
    [
        {"title": ""},
        {"title": "   "},
        {"title": "\n\t"},
        {"title": "\u200b\ufeff\u00ad"},
        {"title": "t" * 201},
        {"title": 42},
        {"title": ["x"]},
        {"title": "nul\x00byte"},
        {"model": 7},
        {"model": ""},
        {"title": "ok", "extra": 1},
        {"chat_id": UNKNOWN_CHAT},
        {"user_id": "mallory"},
    ],
)
async def test_bad_create_bodies_are_400(
    client: httpx.AsyncClient, server: RunningServer, body: dict[str, Any]
) -> None:
    alice = fresh("alice")
    response = await client.post("/api/chat", json=body, headers=auth(alice))
    assert_error(response, 400, "INVALID_REQUEST")
    await assert_no_chats(server, alice)


@pytest.mark.parametrize(
    "raw",
    [b"{", b'{"title": "x",}', b"not json", b"\xff\xfe", b"[]", b'"title"', b"null", b"42", b"{}x"],
)
async def test_malformed_or_non_object_create_body_is_400(
    client: httpx.AsyncClient, server: RunningServer, raw: bytes
) -> None:
    alice = fresh("alice")
    headers = {**auth(alice), "Content-Type": "application/json"}
    response = await client.post("/api/chat", content=raw, headers=headers)
    assert_error(response, 400, "INVALID_REQUEST")
    await assert_no_chats(server, alice)


async def assert_no_chats(server: RunningServer, user: str) -> None:
    query = sa.select(sa.func.count()).select_from(chats).where(chats.c.user_id == user)
    async with server.engine.connect() as conn:
        assert (await conn.execute(query)).scalar_one() == 0


async def test_bad_token_is_401_before_a_bad_body(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/api/chat", content=b"{", headers={"Authorization": "Bearer nope"}
    )
    assert_error(response, 401, "UNAUTHORIZED")


# -- list -----------------------------------------------------------------------------


async def test_list_newest_first_over_pages(client: httpx.AsyncClient) -> None:
    alice = fresh("alice")
    created = [(await create(client, alice, {"title": f"chat {n}"}))["chat_id"] for n in range(7)]
    newest_first = list(reversed(created))

    seen: list[str] = []
    cursor: str | None = None
    pages = []
    while True:
        params: dict[str, Any] = {"limit": 3}
        if cursor:
            params["before"] = cursor
        response = await client.get("/api/chat", params=params, headers=auth(alice))
        assert response.status_code == 200, response.text
        page = response.json()
        assert set(page) == {"chats", "next"}
        pages.append(len(page["chats"]))
        seen += [c["chat_id"] for c in page["chats"]]
        cursor = page["next"]
        if cursor is None:
            break
        assert isinstance(cursor, str)
    assert pages == [3, 3, 1]
    assert seen == newest_first

    everything = (await client.get("/api/chat", headers=auth(alice))).json()
    assert [c["chat_id"] for c in everything["chats"]] == newest_first
    assert everything["next"] is None
    assert [c["title"] for c in everything["chats"]] == [f"chat {n}" for n in range(6, -1, -1)]
    assert all(
        set(c) == {"chat_id", "title", "model", "is_active", "created_at", "updated_at"}
        for c in everything["chats"]
    )


async def test_exact_page_has_no_next(client: httpx.AsyncClient) -> None:
    alice = fresh("alice")
    for _ in range(4):
        await create(client, alice)
    first = (await client.get("/api/chat?limit=2", headers=auth(alice))).json()
    assert len(first["chats"]) == 2 and first["next"]
    second = (
        await client.get(
            "/api/chat", params={"limit": 2, "before": first["next"]}, headers=auth(alice)
        )
    ).json()
    assert len(second["chats"]) == 2
    assert second["next"] is None
    assert not {c["chat_id"] for c in first["chats"]} & {c["chat_id"] for c in second["chats"]}


async def test_cursor_is_stable_when_chats_are_added(client: httpx.AsyncClient) -> None:
    alice = fresh("alice")
    ids = [(await create(client, alice))["chat_id"] for _ in range(4)]
    first = (await client.get("/api/chat?limit=2", headers=auth(alice))).json()
    assert [c["chat_id"] for c in first["chats"]] == [ids[3], ids[2]]
    await create(client, alice)  # a new chat must not shift the next page
    second = (
        await client.get(
            "/api/chat", params={"limit": 2, "before": first["next"]}, headers=auth(alice)
        )
    ).json()
    assert [c["chat_id"] for c in second["chats"]] == [ids[1], ids[0]]
    assert second["next"] is None


async def test_chats_with_equal_timestamps_page_by_id(
    client: httpx.AsyncClient, server: RunningServer
) -> None:
    alice = fresh("alice")
    same = datetime(2030, 6, 1, 12, 0, tzinfo=UTC)
    rows = [
        {
            "chat_id": uuid.uuid4(),
            "user_id": alice,
            "title": f"tied {n}",
            "model": "scripted",
            "is_active": True,
            "created_at": same,
            "updated_at": same,
        }
        for n in range(7)
    ]
    async with server.engine.begin() as conn:
        await conn.execute(chats.insert(), rows)
    seen: list[str] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 2, **({"before": cursor} if cursor else {})}
        page = (await client.get("/api/chat", params=params, headers=auth(alice))).json()
        seen += [c["chat_id"] for c in page["chats"]]
        cursor = page["next"]
        if cursor is None:
            break
    assert seen == sorted((str(r["chat_id"]) for r in rows), key=uuid.UUID, reverse=True)


async def test_list_hides_deleted_and_other_users_chats(client: httpx.AsyncClient) -> None:
    alice, bob, carol = fresh("alice"), fresh("bob"), fresh("carol")
    keep = await create(client, alice, {"title": "keep"})
    gone = await create(client, alice, {"title": "gone"})
    await create(client, bob, {"title": "bob's"})
    response = await client.delete(f"/api/chat/{gone['chat_id']}", headers=auth(alice))
    assert response.status_code == 204
    alice = (await client.get("/api/chat", headers=auth(alice))).json()
    assert [c["chat_id"] for c in alice["chats"]] == [keep["chat_id"]]
    bob = (await client.get("/api/chat", headers=auth(bob))).json()
    assert [c["title"] for c in bob["chats"]] == ["bob's"]
    nobody = (await client.get("/api/chat", headers=auth(carol))).json()
    assert nobody == {"chats": [], "next": None}


async def test_deleted_chats_do_not_break_pages(client: httpx.AsyncClient) -> None:
    alice = fresh("alice")
    ids = [(await create(client, alice))["chat_id"] for _ in range(6)]
    for chat_id in ids[1::2]:
        assert (await client.delete(f"/api/chat/{chat_id}", headers=auth(alice))).status_code == 204
    first = (await client.get("/api/chat?limit=2", headers=auth(alice))).json()
    second = (
        await client.get(
            "/api/chat", params={"limit": 2, "before": first["next"]}, headers=auth(alice)
        )
    ).json()
    listed = [c["chat_id"] for c in first["chats"] + second["chats"]]
    assert listed == [ids[4], ids[2], ids[0]]
    assert second["next"] is None


@pytest.mark.parametrize(
    "query",
    [
        "limit=0",
        "limit=101",
        "limit=-1",
        "limit=abc",
        "limit=1.5",
        "before=not-a-cursor",
        "before=" + "x" * 201,
        "before=YWJj",
    ],
)
async def test_bad_list_queries_are_400(client: httpx.AsyncClient, query: str) -> None:
    alice = fresh("alice")
    assert_error(
        await client.get(f"/api/chat?{query}", headers=auth(alice)), 400, "INVALID_REQUEST"
    )


async def test_list_limit_bounds_are_accepted(client: httpx.AsyncClient) -> None:
    alice = fresh("alice")
    await create(client, alice)
    for limit in (1, 100):
        response = await client.get(f"/api/chat?limit={limit}", headers=auth(alice))
        assert response.status_code == 200, response.text
        assert len(response.json()["chats"]) == 1


# -- get ------------------------------------------------------------------------------


async def test_get_new_chat_has_no_messages(client: httpx.AsyncClient) -> None:
    alice = fresh("alice")
    chat = await create(client, alice, {"title": "Empty"})
    response = await client.get(f"/api/chat/{chat['chat_id']}", headers=auth(alice))
    assert response.status_code == 200, response.text
    assert response.json() == {**chat, "messages": []}


async def test_get_returns_messages_oldest_first(
    client: httpx.AsyncClient, server: RunningServer
) -> None:
    alice = fresh("alice")
    chat = await create(client, alice)
    other = await create(client, alice)
    start = datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    rows = [
        ("user", "first question", "complete"),
        ("assistant", "first answer", "complete"),
        ("user", "second question", "complete"),
        ("assistant", "half an ans", "stopped"),
        ("user", "third", "complete"),
        ("assistant", "", "failed"),
    ]
    ids = await insert_messages(server, chat["chat_id"], rows, start)
    await insert_messages(server, other["chat_id"], [("user", "elsewhere", "complete")], start)

    response = await client.get(f"/api/chat/{chat['chat_id']}", headers=auth(alice))
    assert response.status_code == 200, response.text
    body = response.json()
    assert {k: body[k] for k in chat} == chat
    got = body["messages"]
    assert [m["message_id"] for m in got] == ids
    assert [(m["role"], m["content"], m["status"]) for m in got] == rows
    assert [m["tokens_consumed"] for m in got] == [0, 11, 0, 13, 0, 15]
    for n, message in enumerate(got):
        assert {"message_id", "role", "content", "tokens_consumed", "status", "created_at"} <= set(
            message
        )
        assert parse_time(message["created_at"]) == start + timedelta(seconds=n)
    assert got[1]["finish_reason"] == "stop"
    assert got[1]["metering_source"] == "provider"


async def test_get_after_real_exchanges(client: httpx.AsyncClient) -> None:
    alice = fresh("alice")
    chat = await create(client, alice)
    for text in ("one", "two"):
        result = await stream_message(client, chat["chat_id"], text, token_for(alice))
        assert result.status == 200 and result.last.get("done") is True, result.events
    got = (await client.get(f"/api/chat/{chat['chat_id']}", headers=auth(alice))).json()
    reply = "Hello there, this is a scripted reply."
    assert [(m["role"], m["content"]) for m in got["messages"]] == [
        ("user", "one"),
        ("assistant", reply),
        ("user", "two"),
        ("assistant", reply),
    ]
    assert [m["status"] for m in got["messages"]] == ["complete"] * 4
    assert got["messages"][0]["tokens_consumed"] == 0
    assert got["messages"][1]["tokens_consumed"] > 0


# -- rename ---------------------------------------------------------------------------


async def test_rename(client: httpx.AsyncClient, server: RunningServer) -> None:
    alice = fresh("alice")
    chat = await create(client, alice)
    response = await client.patch(
        f"/api/chat/{chat['chat_id']}", json={"title": "  Renamed  "}, headers=auth(alice)
    )
    assert response.status_code == 200, response.text
    renamed = response.json()
    assert renamed["title"] == "Renamed"
    assert renamed["chat_id"] == chat["chat_id"]
    assert renamed["model"] == chat["model"]
    assert renamed["is_active"] is True
    assert renamed["created_at"] == chat["created_at"]
    assert parse_time(renamed["updated_at"]) > parse_time(chat["updated_at"])
    assert (await chat_row(server, chat["chat_id"])).title == "Renamed"
    got = (await client.get(f"/api/chat/{chat['chat_id']}", headers=auth(alice))).json()
    assert got["title"] == "Renamed"


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"title": ""},
        {"title": "  "},
        {"title": "t" * 201},
        {"title": None},
        {"title": 5},
        {"title": "ok", "model": "local"},
        [],
        "title",
        None,
    ],
)
async def test_bad_rename_bodies_are_400(
    client: httpx.AsyncClient, server: RunningServer, body: Any
) -> None:
    alice = fresh("alice")
    chat = await create(client, alice, {"title": "Original"})
    response = await client.patch(f"/api/chat/{chat['chat_id']}", json=body, headers=auth(alice))
    assert_error(response, 400, "INVALID_REQUEST")
    assert (await chat_row(server, chat["chat_id"])).title == "Original"


@pytest.mark.parametrize("raw", [b"", b"{", b"title=x"])
async def test_malformed_rename_body_is_400(client: httpx.AsyncClient, raw: bytes) -> None:
    alice = fresh("alice")
    chat = await create(client, alice)
    response = await client.patch(
        f"/api/chat/{chat['chat_id']}",
        content=raw,
        headers={**auth(alice), "Content-Type": "application/json"},
    )
    assert_error(response, 400, "INVALID_REQUEST")


# -- delete ---------------------------------------------------------------------------


async def test_soft_delete(client: httpx.AsyncClient, server: RunningServer) -> None:
    alice, bob = fresh("alice"), fresh("bob")
    chat = await create(client, alice)
    await insert_messages(server, chat["chat_id"], [("user", "hi", "complete")], datetime.now(UTC))
    response = await client.delete(f"/api/chat/{chat['chat_id']}", headers=auth(alice))
    assert response.status_code == 204
    assert response.content == b""

    row = await chat_row(server, chat["chat_id"])
    assert row is not None, "a soft delete keeps the row"
    assert row.is_active is False
    async with server.engine.connect() as conn:
        kept = (
            await conn.execute(
                sa.select(sa.func.count())
                .select_from(messages)
                .where(messages.c.chat_id == uuid.UUID(chat["chat_id"]))
            )
        ).scalar_one()
    assert kept == 1

    path = f"/api/chat/{chat['chat_id']}"
    assert_error(await client.get(path, headers=auth(alice)), 404, "CHAT_NOT_FOUND")
    assert_error(
        await client.patch(path, json={"title": "x"}, headers=auth(alice)), 404, "CHAT_NOT_FOUND"
    )
    assert_error(await client.delete(path, headers=auth(alice)), 404, "CHAT_NOT_FOUND")
    assert_error(
        await client.post(f"{path}/message", json={"message": "hi"}, headers=auth(alice)),
        404,
        "CHAT_NOT_FOUND",
    )
    assert_error(await client.post(f"{path}/stop", headers=auth(alice)), 404, "CHAT_NOT_FOUND")
    # a deleted chat of another user is unknown to them too (404 comes before 403)
    assert_error(await client.get(path, headers=auth(bob)), 404, "CHAT_NOT_FOUND")
    assert (await chat_row(server, chat["chat_id"])).title == "New chat"


async def test_concurrent_creates_renames_and_deletes_all_succeed(
    client: httpx.AsyncClient, server: RunningServer
) -> None:
    """On SQLite a transaction that reads and then writes must take the write lock up
    front, or a concurrent writer makes it fail at once with SQLITE_BUSY (a 500)."""
    alice = fresh("alice")
    ids = [(await create(client, alice))["chat_id"] for _ in range(20)]
    renamed, deleted = ids[:10], ids[10:]
    responses = await asyncio.gather(
        *(
            client.patch(f"/api/chat/{c}", json={"title": f"renamed {n}"}, headers=auth(alice))
            for n, c in enumerate(renamed)
        ),
        *(client.delete(f"/api/chat/{c}", headers=auth(alice)) for c in deleted),
        *(client.post("/api/chat", json={"title": "new"}, headers=auth(alice)) for _ in range(10)),
    )
    statuses = [r.status_code for r in responses]
    assert statuses == [200] * 10 + [204] * 10 + [201] * 10, [r.text for r in responses]
    for n, chat_id in enumerate(renamed):
        assert (await chat_row(server, chat_id)).title == f"renamed {n}"
    for chat_id in deleted:
        assert (await chat_row(server, chat_id)).is_active is False
    listed = (await client.get("/api/chat?limit=100", headers=auth(alice))).json()["chats"]
    assert len(listed) == 20


# -- ids, ownership, unknown chats -----------------------------------------------------


def every_chat_request(chat_id: str) -> list[tuple[str, str, Any]]:
    path = f"/api/chat/{chat_id}"
    return [
        ("GET", path, None),
        ("PATCH", path, {"title": "mine now"}),
        ("DELETE", path, None),
        ("POST", f"{path}/message", {"message": "hello"}),
        ("POST", f"{path}/stop", None),
    ]


@pytest.mark.parametrize(
    "chat_id", ["not-a-uuid", "123", "00000000-0000-4000-8000-00000000000", "g" * 32, "%20"]
)
async def test_chat_id_not_a_uuid_is_400(client: httpx.AsyncClient, chat_id: str) -> None:
    alice = fresh("alice")
    for method, path, body in every_chat_request(chat_id):
        response = await client.request(method, path, json=body, headers=auth(alice))
        assert_error(response, 400, "INVALID_CHAT_ID")


async def test_unknown_chat_is_404(client: httpx.AsyncClient) -> None:
    alice = fresh("alice")
    for method, path, body in every_chat_request(UNKNOWN_CHAT):
        response = await client.request(method, path, json=body, headers=auth(alice))
        assert_error(response, 404, "CHAT_NOT_FOUND")


async def test_another_users_chat_is_403(client: httpx.AsyncClient, server: RunningServer) -> None:
    alice, mallory, root = fresh("alice"), fresh("mallory"), fresh("root")
    chat = await create(client, alice, {"title": "Private"})
    for method, path, body in every_chat_request(chat["chat_id"]):
        response = await client.request(method, path, json=body, headers=auth(mallory))
        assert_error(response, 403, "FORBIDDEN")
    row = await chat_row(server, chat["chat_id"])
    assert (row.title, row.is_active, row.user_id) == ("Private", True, alice)
    got = (await client.get(f"/api/chat/{chat['chat_id']}", headers=auth(alice))).json()
    assert got["messages"] == []  # mallory's message was never saved
    # not even an admin reads someone else's chat through the user API
    response = await client.get(f"/api/chat/{chat['chat_id']}", headers=auth(root, admin=True))
    assert_error(response, 403, "FORBIDDEN")


async def test_stop_without_a_reply_is_404_no_active_reply(client: httpx.AsyncClient) -> None:
    alice = fresh("alice")
    chat = await create(client, alice)
    response = await client.post(f"/api/chat/{chat['chat_id']}/stop", headers=auth(alice))
    assert_error(response, 404, "NO_ACTIVE_REPLY")


# -- order of the checks on POST /api/chat/{id}/message (SPEC section 4) --------------


async def test_message_checks_in_contract_order(client: httpx.AsyncClient) -> None:
    alice, bob = fresh("alice"), fresh("bob")
    mine = (await create(client, alice))["chat_id"]
    theirs = (await create(client, bob))["chat_id"]

    async def post(chat_id: str, body: Any, headers: dict[str, str]) -> httpx.Response:
        return await client.post(f"/api/chat/{chat_id}/message", json=body, headers=headers)

    bad = {"message": ""}
    good = {"message": "hello"}
    no_token: dict[str, str] = {}
    # 401 before everything
    assert_error(await post("nope", bad, no_token), 401, "UNAUTHORIZED")
    assert_error(await post(theirs, bad, {"Authorization": "Bearer x"}), 401, "UNAUTHORIZED")
    # then the chat id
    assert_error(await post("nope", bad, auth(alice)), 400, "INVALID_CHAT_ID")
    assert_error(await post("nope", good, auth(alice)), 400, "INVALID_CHAT_ID")
    # then the message
    assert_error(await post(UNKNOWN_CHAT, bad, auth(alice)), 400, "INVALID_MESSAGE")
    assert_error(await post(theirs, bad, auth(alice)), 400, "INVALID_MESSAGE")
    # then 404
    assert_error(await post(UNKNOWN_CHAT, good, auth(alice)), 404, "CHAT_NOT_FOUND")
    # then 403
    assert_error(await post(theirs, good, auth(alice)), 403, "FORBIDDEN")
    # and the owner gets a stream
    result = await stream_message(client, mine, "hello", token_for(alice))
    assert result.status == 200 and result.last.get("done") is True


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"message": None},
        {"message": 5},
        {"message": ["hi"]},
        {"message": {"text": "hi"}},
        {"message": ""},
        {"message": "   "},
        {"message": "\n\t "},
        {"message": "\u200b\u200c\u200d\u2060\ufeff\u00ad"},
        {"message": "\u200b " * 100},
        {"message": "\u3000\u00a0\u2028\u202e\u2066\u2069\u034f\ufe0f"},
        {"message": "\x01\x07\x1b"},
        {"msg": "hi"},
        {"message": True},
    ],
)
async def test_invalid_messages_are_400_invalid_message(
    client: httpx.AsyncClient, server: RunningServer, body: dict[str, Any]
) -> None:
    alice = fresh("alice")
    chat = (await create(client, alice))["chat_id"]
    response = await client.post(f"/api/chat/{chat}/message", json=body, headers=auth(alice))
    assert_error(response, 400, "INVALID_MESSAGE")
    got = (await client.get(f"/api/chat/{chat}", headers=auth(alice))).json()
    assert got["messages"] == []


@pytest.mark.parametrize("raw", [b"", b"{", b"message=hi", b'{"message": "hi"', b"[]", b'"hi"'])
async def test_malformed_message_body_is_400_invalid_request(
    client: httpx.AsyncClient, raw: bytes
) -> None:
    alice = fresh("alice")
    chat = (await create(client, alice))["chat_id"]
    headers = {**auth(alice), "Content-Type": "application/json"}
    response = await client.post(f"/api/chat/{chat}/message", content=raw, headers=headers)
    assert_error(response, 400, "INVALID_REQUEST")
    # malformed JSON is refused before the chat is looked up
    response = await client.post(f"/api/chat/{UNKNOWN_CHAT}/message", content=raw, headers=headers)
    assert_error(response, 400, "INVALID_REQUEST")


async def test_message_length_limit_comes_from_settings(database_url: str) -> None:
    alice = fresh("alice")
    settings = make_settings(database_url, max_message_chars=20)
    async with serve(settings) as running, httpx.AsyncClient(base_url=running.url) as client:
        chat = (await create(client, alice))["chat_id"]
        too_long = await client.post(
            f"/api/chat/{chat}/message", json={"message": "x" * 21}, headers=auth(alice)
        )
        body = assert_error(too_long, 400, "INVALID_MESSAGE")
        assert "20" in body["message"]
        result = await stream_message(client, chat, "y" * 20, token_for(alice))
        assert result.status == 200, result.body
        assert result.last.get("done") is True
        got = (await client.get(f"/api/chat/{chat}", headers=auth(alice))).json()
        assert [m["content"] for m in got["messages"] if m["role"] == "user"] == ["y" * 20]


async def test_default_message_limit_is_5000(client: httpx.AsyncClient) -> None:
    alice = fresh("alice")
    chat = (await create(client, alice))["chat_id"]
    response = await client.post(
        f"/api/chat/{chat}/message", json={"message": "x" * 5001}, headers=auth(alice)
    )
    assert_error(response, 400, "INVALID_MESSAGE")
    result = await stream_message(client, chat, "x" * 5000, token_for(alice))
    assert result.status == 200, result.body
