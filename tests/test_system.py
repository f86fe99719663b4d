"""Health, readiness, metrics, the API description, the page, the error shape of
routing errors, and the body limit: over real HTTP, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from chatmeter.config import Settings
from tests.conftest import auth, make_settings, token_for
from tests.support.postgres import free_port
from tests.support.server import RunningServer, serve
from tests.support.shared_server import fresh, shared_server_fixtures
from tests.support.sse import stream_message

backend, server, client = shared_server_fixtures()

MAX_BODY = 64 * 1024


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body: dict[str, Any] = response.json()
    assert set(body) == {"error", "code", "message"}, body
    assert (body["error"], body["code"]) == (True, code)
    assert isinstance(body["message"], str) and body["message"].strip()
    return body


async def test_healthz(client: httpx.AsyncClient) -> None:
    response = await client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/"])
async def test_head_answers_where_checks_probe(client: httpx.AsyncClient, path: str) -> None:
    response = await client.head(path)
    assert response.status_code == 200, response.text
    assert response.content == b""


async def test_readyz(client: httpx.AsyncClient) -> None:
    response = await client.get("/readyz")
    assert response.status_code == 200, response.text
    assert response.json() == {"status": "ready"}


def unreachable_databases(tmp_path: Path) -> dict[str, str]:
    return {
        "postgres on a closed port": (
            f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/chatmeter"
        ),
        "sqlite in a missing directory": (
            f"sqlite+aiosqlite:///{tmp_path / 'no' / 'such' / 'dir' / 'chatmeter.db'}"
        ),
    }


@pytest.mark.parametrize("which", ["postgres on a closed port", "sqlite in a missing directory"])
async def test_readyz_is_503_when_the_database_is_unreachable(tmp_path: Path, which: str) -> None:
    settings = make_settings(unreachable_databases(tmp_path)[which])
    async with serve(settings) as running, httpx.AsyncClient(base_url=running.url) as http:
        response = await http.get("/readyz")
        assert_error(response, 503, "DATABASE_UNAVAILABLE")
        # liveness does not depend on the database
        assert (await http.get("/healthz")).status_code == 200
        # a request that needs the database fails in the error shape, not a bare 500 page
        usage = await http.get("/api/usage", headers=auth("alice"))
        assert usage.status_code >= 500
        assert usage.json()["error"] is True
        assert usage.json()["code"] == usage.json()["code"].upper()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


async def test_metrics(client: httpx.AsyncClient) -> None:
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    names = {family.name for family in text_string_to_metric_families(response.text)}
    for expected in (
        "chatmeter_exchanges",
        "chatmeter_tokens_billed",
        "chatmeter_count_token_calls",
        "chatmeter_budget_refusals",
        "chatmeter_active_streams",
    ):
        assert expected in names, names
    assert all(name.startswith("chatmeter_") for name in names), names
    assert samples(response.text)[("chatmeter_active_streams", ())] == 0


async def test_metrics_count_an_exchange(client: httpx.AsyncClient) -> None:
    complete = ("chatmeter_exchanges_total", (("source", "provider"), ("status", "complete")))
    billed = ("chatmeter_tokens_billed_total", (("kind", "total"), ("model", "scripted")))
    before = samples((await client.get("/metrics")).text)
    alice = fresh("alice")
    chat = (await client.post("/api/chat", json={}, headers=auth(alice))).json()["chat_id"]
    result = await stream_message(client, chat, "Hi!", token_for(alice))
    assert result.last.get("done") is True
    after = samples((await client.get("/metrics")).text)
    assert after[complete] - before.get(complete, 0) == 1
    assert after[billed] - before.get(billed, 0) == result.last["tokens_used"]


async def test_openapi_describes_the_api(client: httpx.AsyncClient) -> None:
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    spec = response.json()
    assert spec["info"]["title"] == "chatmeter"
    operations = {(method.upper(), path) for path, ops in spec["paths"].items() for method in ops}
    expected = {
        ("POST", "/api/chat"),
        ("GET", "/api/chat"),
        ("GET", "/api/chat/{chat_id}"),
        ("PATCH", "/api/chat/{chat_id}"),
        ("DELETE", "/api/chat/{chat_id}"),
        ("POST", "/api/chat/{chat_id}/message"),
        ("POST", "/api/chat/{chat_id}/stop"),
        ("GET", "/api/usage"),
        ("GET", "/api/usage/events"),
        ("PUT", "/api/admin/users/{user_id}/limit"),
        ("GET", "/api/admin/users/{user_id}/usage"),
        ("GET", "/healthz"),
        ("GET", "/readyz"),
        ("GET", "/metrics"),
    }
    assert expected <= operations, expected - operations
    for path, ops in spec["paths"].items():
        for method, operation in ops.items():
            # bad requests are 400 INVALID_REQUEST, never FastAPI's 422
            assert "422" not in operation["responses"], (method, path)
    assert "201" in spec["paths"]["/api/chat"]["post"]["responses"]
    assert "204" in spec["paths"]["/api/chat/{chat_id}"]["delete"]["responses"]
    assert "text/event-stream" in json.dumps(
        spec["paths"]["/api/chat/{chat_id}/message"]["post"]["responses"]["200"]
    )


async def test_docs_page(client: httpx.AsyncClient) -> None:
    response = await client.get("/docs")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "/openapi.json" in response.text


async def test_web_page(client: httpx.AsyncClient) -> None:
    response = await client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "<html" in response.text.lower()


@pytest.mark.parametrize(
    "path", ["/nope", "/api", "/api/nope", "/api/chat/a/b/c", "/api/usage/events/1", "/static/x"]
)
async def test_unknown_path_is_404_in_the_error_shape(client: httpx.AsyncClient, path: str) -> None:
    assert_error(await client.get(path, headers=auth("alice")), 404, "NOT_FOUND")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("PUT", "/api/chat"),
        ("DELETE", "/api/chat"),
        ("POST", "/api/usage"),
        ("GET", "/api/chat/00000000-0000-4000-8000-000000000000/message"),
        ("DELETE", "/api/admin/users/u/limit"),
        ("POST", "/healthz"),
        ("POST", "/metrics"),
    ],
)
async def test_wrong_method_is_405_in_the_error_shape(
    client: httpx.AsyncClient, method: str, path: str
) -> None:
    response = await client.request(method, path, headers=auth("alice"))
    assert_error(response, 405, "METHOD_NOT_ALLOWED")
    assert response.headers.get("allow"), "a 405 says which methods are allowed"


# -- the body limit ---------------------------------------------------------------------


def title_body(size: int) -> bytes:
    """A JSON object of exactly `size` bytes."""
    frame = b'{"title": ""}'
    return frame[:-2] + b"x" * (size - len(frame)) + frame[-2:]


async def chunked(body: bytes, piece: int = 8192) -> AsyncIterator[bytes]:
    for start in range(0, len(body), piece):
        yield body[start : start + piece]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/api/chat"),
        ("PATCH", "/api/chat/00000000-0000-4000-8000-000000000000"),
        ("POST", "/api/chat/00000000-0000-4000-8000-000000000000/message"),
        ("PUT", "/api/admin/users/u/limit"),
        ("GET", "/healthz"),
    ],
)
async def test_body_over_the_limit_is_413(
    client: httpx.AsyncClient, method: str, path: str
) -> None:
    body = title_body(MAX_BODY + 1)
    headers = {**auth("alice", admin=True), "Content-Type": "application/json"}
    with_length = await client.request(method, path, content=body, headers=headers)
    assert_error(with_length, 413, "PAYLOAD_TOO_LARGE")


async def test_chunked_body_over_the_limit_is_413(
    client: httpx.AsyncClient, server: RunningServer
) -> None:
    alice = fresh("alice")
    headers = {**auth(alice), "Content-Type": "application/json"}
    response = await client.post(
        "/api/chat", content=chunked(title_body(MAX_BODY + 1)), headers=headers
    )
    assert "content-length" not in response.request.headers
    assert response.request.headers["transfer-encoding"] == "chunked"
    assert_error(response, 413, "PAYLOAD_TOO_LARGE")
    big = await client.post(
        "/api/chat", content=chunked(title_body(10 * MAX_BODY)), headers=headers
    )
    assert_error(big, 413, "PAYLOAD_TOO_LARGE")
    assert (await client.get("/api/chat", headers=auth(alice))).json()["chats"] == []


async def test_body_at_the_limit_is_read(client: httpx.AsyncClient) -> None:
    alice = fresh("alice")
    headers = {**auth(alice), "Content-Type": "application/json"}
    # exactly the limit: read and refused for what it says (a title over 200 characters)
    at_limit = await client.post("/api/chat", content=title_body(MAX_BODY), headers=headers)
    assert_error(at_limit, 400, "INVALID_REQUEST")
    streamed = await client.post(
        "/api/chat", content=chunked(title_body(MAX_BODY)), headers=headers
    )
    assert_error(streamed, 400, "INVALID_REQUEST")
    small = await client.post(
        "/api/chat", content=chunked(b'{"title": "chunked"}'), headers=headers
    )
    assert small.status_code == 201, small.text
    assert small.json()["title"] == "chunked"


async def test_body_limit_comes_from_settings(database_url: str) -> None:
    settings: Settings = make_settings(database_url, max_body_bytes=2048)
    async with serve(settings) as running, httpx.AsyncClient(base_url=running.url) as http:
        headers = {**auth("alice"), "Content-Type": "application/json"}
        response = await http.post("/api/chat", content=title_body(2049), headers=headers)
        body = assert_error(response, 413, "PAYLOAD_TOO_LARGE")
        assert "2048" in body["message"]
        ok = await http.post("/api/chat", content=title_body(200 + 13), headers=headers)
        assert ok.status_code == 201, ok.text
