"""Hostile bodies on every endpoint that reads one: too large (with and without a
Content-Length) is 413; malformed, ambiguous, mistyped or mislabelled is 400 (never 422,
never 500), and nothing is written."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from chatmeter.config import load_settings
from tests.conftest import TEST_SECRET, auth, scripted
from tests.hostile import raw_request
from tests.support.server import serve

ALICE = "alice-hostile-bodies"
ADMIN = auth("root", admin=True)
JSON = "application/json"
DEFAULT_MAX = 64 * 1024


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body == {"error": True, "code": code, "message": body["message"]}
    assert body["message"]


class Target:
    """The body-reading endpoints, each on a real chat of ALICE, and what they stored."""

    def __init__(self, client: httpx.AsyncClient, chat_id: str) -> None:
        self.client = client
        self.chat_id = chat_id

    def endpoints(self) -> dict[str, tuple[str, str, dict[str, str]]]:
        chat = f"/api/chat/{self.chat_id}"
        return {
            "create": ("POST", "/api/chat", auth(ALICE)),
            "rename": ("PATCH", chat, auth(ALICE)),
            "message": ("POST", f"{chat}/message", auth(ALICE)),
            "limit": ("PUT", f"/api/admin/users/{ALICE}/limit", ADMIN),
        }

    async def send(
        self, name: str, content: Any, content_type: str | None = JSON
    ) -> httpx.Response:
        method, path, headers = self.endpoints()[name]
        headers = {**headers, **({"Content-Type": content_type} if content_type else {})}
        return await self.client.request(method, path, content=content, headers=headers)

    async def state(self) -> dict[str, Any]:
        chats = (await self.client.get("/api/chat", headers=auth(ALICE))).json()["chats"]
        chat = (await self.client.get(f"/api/chat/{self.chat_id}", headers=auth(ALICE))).json()
        usage = await self.client.get(f"/api/admin/users/{ALICE}/usage", headers=ADMIN)
        return {
            "chats": len(chats),
            "title": chat["title"],
            "messages": chat["messages"],
            "limit": usage.json()["token_limit"],
        }


@pytest.fixture
async def target(client: httpx.AsyncClient) -> AsyncIterator[Target]:
    created = await client.post("/api/chat", json={"title": "Original"}, headers=auth(ALICE))
    assert created.status_code == 201, created.text
    yield Target(client, created.json()["chat_id"])


def padded(name: str, size: int) -> bytes:
    """A valid body for endpoint `name` of exactly `size` bytes (JSON whitespace pads it)."""
    body = {
        "create": {"title": "t"},
        "rename": {"title": "t"},
        "message": {"message": "hi"},
        "limit": {"token_limit": 5},
    }[name]
    raw = json.dumps(body).encode()
    return raw[:-1] + b" " * (size - len(raw)) + b"}"


async def chunked(data: bytes) -> AsyncIterator[bytes]:
    """A body with no Content-Length (chunked transfer encoding)."""
    for start in range(0, len(data), 8192):
        yield data[start : start + 8192]


async def test_over_the_limit_is_413_with_or_without_content_length(target: Target) -> None:
    before = await target.state()
    for name in target.endpoints():
        for size in (DEFAULT_MAX + 1, 10 * DEFAULT_MAX):
            body = padded(name, size)
            assert_error(await target.send(name, body), 413, "PAYLOAD_TOO_LARGE")
            assert_error(await target.send(name, chunked(body)), 413, "PAYLOAD_TOO_LARGE")
    assert await target.state() == before


async def test_at_the_limit_is_read(target: Target) -> None:
    # the limit last: it lowers the budget the message needs
    for name, status in (("message", 200), ("rename", 200), ("create", 201), ("limit", 200)):
        response = await target.send(name, padded(name, DEFAULT_MAX))
        assert response.status_code == status, (name, response.text)
        response = await target.send(name, chunked(padded(name, DEFAULT_MAX)))
        assert response.status_code == status, (name, response.text)


async def test_a_content_length_no_one_could_send_is_413(target: Target) -> None:
    base = str(target.client.base_url)
    # (a length past 2**64 never reaches the app: the HTTP parser refuses it, with 400)
    for length in (b"1000000000000", b"65537"):
        head = (
            (
                f"PUT /api/admin/users/{ALICE}/limit HTTP/1.1\r\nHost: chatmeter\r\n"
                f"Authorization: {ADMIN['Authorization']}\r\nContent-Type: application/json\r\n"
            ).encode()
            + b"Content-Length: "
            + length
        )
        response = await raw_request(base, head)
        assert response.status == 413, response
        assert response.json()["code"] == "PAYLOAD_TOO_LARGE"


async def test_the_limit_comes_from_chatmeter_max_body_bytes(
    database_url: str, tmp_path: Path
) -> None:
    environ = {
        "CHATMETER_DATABASE_URL": database_url,
        "CHATMETER_JWT_SECRET": TEST_SECRET,
        "CHATMETER_DEFAULT_MODEL": "scripted",
        "CHATMETER_MAX_BODY_BYTES": "2048",
        "CHATMETER_OUTBOX_DIR": str(tmp_path / "outbox"),
    }
    settings = load_settings(environ, models={"scripted": scripted(reply="ok", chunks=1)})
    async with serve(settings) as running:
        async with httpx.AsyncClient(base_url=running.url, timeout=30) as client:
            created = await client.post("/api/chat", json={}, headers=auth(ALICE))
            target = Target(client, created.json()["chat_id"])
            for name in target.endpoints():
                assert (await target.send(name, padded(name, 2048))).status_code < 300, name
                for body in (padded(name, 2049), chunked(padded(name, 2049))):
                    assert_error(await target.send(name, body), 413, "PAYLOAD_TOO_LARGE")


NESTED = 5000  # past any parser's depth limit, and well under 64 KiB
MALFORMED: dict[str, tuple[bytes, str | None]] = {
    "deeply nested arrays": (b"[" * NESTED + b"]" * NESTED, JSON),
    "deeply nested objects": (b'{"a":' * NESTED + b"1" + b"}" * NESTED, JSON),
    "an array": (b'[{"message": "hi", "title": "t", "token_limit": 5}]', JSON),
    "a string": (b'"hi"', JSON),
    "a number": (b"5", JSON),
    "null": (b"null", JSON),
    "a number too large for a double": (b'{"token_limit": ' + b"9" * 400 + b"}", JSON),
    "1e400": (b'{"message": 1e400, "title": 1e400, "token_limit": 1e400}', JSON),
    "NaN": (b'{"message": NaN, "title": NaN, "token_limit": NaN}', JSON),
    "Infinity": (b'{"token_limit": Infinity}', JSON),
    "a repeated key": (
        b'{"message": "a", "message": "b", "title": "a", "title": "b", '
        b'"token_limit": 1, "token_limit": 2}',
        JSON,
    ),
    "a repeated key in a nested object": (
        b'{"x": {"a": 1, "a": 2}, "message": "hi", "title": "t", "token_limit": 5}',
        JSON,
    ),
    "trailing garbage": (b'{"message": "hi", "title": "t", "token_limit": 5} x', JSON),
    "a trailing comma": (b'{"message": "hi", "title": "t", "token_limit": 5,}', JSON),
    "single quotes": (b"{'message': 'hi', 'title': 't', 'token_limit': 5}", JSON),
    "a comment": (b'{"message": "hi" /* c */, "title": "t", "token_limit": 5}', JSON),
    "invalid UTF-8": (b'{"message": "\xff", "title": "\xff", "token_limit": 5}', JSON),
    "an overlong UTF-8 slash": (b'{"message": "\xc0\xaf", "title": "\xc0\xaf"}', JSON),
    "a UTF-8 encoded surrogate": (b'{"message": "\xed\xa0\x80", "title": "\xed\xa0\x80"}', JSON),
    "an escaped lone surrogate": (b'{"message": "\\ud800", "title": "\\udc00x"}', JSON),
    "a reversed surrogate pair": (
        b'{"message": "\\ude00\\ud83d", "title": "\\ude00\\ud83d"}',
        JSON,
    ),
    "text/plain": (b'{"message": "hi", "title": "t", "token_limit": 5}', "text/plain"),
    "a form": (b"message=hi&title=t&token_limit=5", "application/x-www-form-urlencoded"),
    "multipart": (
        b'--b\r\nContent-Disposition: form-data; name="message"\r\n\r\nhi\r\n--b--\r\n',
        "multipart/form-data; boundary=b",
    ),
    "a JSON look-alike type": (
        b'{"message": "hi", "title": "t", "token_limit": 5}',
        "application/jsonp",
    ),
}


@pytest.mark.parametrize("name", ["create", "rename", "message", "limit"])
async def test_malformed_bodies_are_400_invalid_request(target: Target, name: str) -> None:
    before = await target.state()
    for case, (body, content_type) in MALFORMED.items():
        response = await target.send(name, body, content_type)
        assert response.status_code == 400, (case, response.text)
        assert_error(response, 400, "INVALID_REQUEST")
    empty = await target.send(name, b"")
    if name == "create":  # its body is optional
        assert empty.status_code == 201, empty.text
    else:
        assert_error(empty, 400, "INVALID_REQUEST")
        assert await target.state() == before


WRONG_TYPES: dict[str, list[tuple[dict[str, Any], str]]] = {
    "create": [
        ({"title": 5}, "INVALID_REQUEST"),
        ({"title": ["x"]}, "INVALID_REQUEST"),
        ({"title": {"x": 1}}, "INVALID_REQUEST"),
        ({"title": True}, "INVALID_REQUEST"),
        ({"model": 5}, "INVALID_REQUEST"),
        ({"title": "t", "admin": True}, "INVALID_REQUEST"),
    ],
    "rename": [
        ({"title": None}, "INVALID_REQUEST"),
        ({"title": 5}, "INVALID_REQUEST"),
        ({"title": ["x"]}, "INVALID_REQUEST"),
        ({"name": "x"}, "INVALID_REQUEST"),
    ],
    "message": [
        ({"message": 5}, "INVALID_MESSAGE"),
        ({"message": ["hi"]}, "INVALID_MESSAGE"),
        ({"message": {"text": "hi"}}, "INVALID_MESSAGE"),
        ({"message": None}, "INVALID_MESSAGE"),
        ({"message": True}, "INVALID_MESSAGE"),
        ({"text": "hi"}, "INVALID_MESSAGE"),
    ],
    "limit": [
        ({"token_limit": "5"}, "INVALID_REQUEST"),
        ({"token_limit": 5.5}, "INVALID_REQUEST"),
        ({"token_limit": 5.0}, "INVALID_REQUEST"),
        ({"token_limit": True}, "INVALID_REQUEST"),
        ({"token_limit": -1}, "INVALID_REQUEST"),
        ({"token_limit": 2**63}, "INVALID_REQUEST"),
        ({"token_limit": 10**30}, "INVALID_REQUEST"),
        ({"token_limit": None}, "INVALID_REQUEST"),
        ({"token_limit": [5]}, "INVALID_REQUEST"),
        ({"token_limit": 5, "total_tokens_used": 0}, "INVALID_REQUEST"),
    ],
}


async def test_wrong_types_are_400(target: Target) -> None:
    before = await target.state()
    for name, cases in WRONG_TYPES.items():
        for body, code in cases:
            response = await target.send(name, json.dumps(body).encode())
            assert response.status_code == 400, (name, body, response.text)
            assert_error(response, 400, code)
    assert await target.state() == before


async def test_json_media_types_with_parameters_are_read(target: Target) -> None:
    for content_type in (
        None,  # a bare client that names no type: the body is read as JSON
        "application/json; charset=utf-8",
        "Application/JSON",
        "application/merge-patch+json",
    ):
        response = await target.send("rename", b'{"title": "Renamed"}', content_type)
        assert response.status_code == 200, (content_type, response.text)


async def test_hostile_query_strings_are_400(client: httpx.AsyncClient) -> None:
    for path in ("/api/chat", "/api/usage/events"):
        for query in (
            "limit=abc",
            "limit=1e999",
            "limit=99999999999999999999999999",
            "limit=-1",
            "limit=0",
            "limit=%00",
            "before=%00%ff",
            "before=" + "A" * 201,
            "before=not-a-cursor",
        ):
            response = await client.get(f"{path}?{query}", headers=auth(ALICE))
            assert_error(response, 400, "INVALID_REQUEST")
