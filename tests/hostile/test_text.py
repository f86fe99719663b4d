"""Hostile text, in and out: emoji sequences, right-to-left and bidi controls, combining
marks, separators, controls, markup, SSE look-alikes. What goes in comes back byte-exact
from the API and sits byte-exact in the database row; what the model says is streamed in
pieces (cut through the middle of graphemes) that join to exactly what is saved. What no
database can hold (NUL, lone surrogates) is refused with 400, the same on both backends."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import auth, make_settings, scripted
from tests.support.db import chat_rows
from tests.support.server import RunningServer, serve

USER = "hostile-text-user"

TEXTS = {
    "ZWJ family": "\U0001f468\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466 family",
    "flags and a tag sequence": "\U0001f1eb\U0001f1f7\U0001f1ef\U0001f1f5"
    "\U0001f3f4\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f",
    "skin tone and keycaps": "\U0001f44d\U0001f3fd 1\ufe0f\u20e3 #\ufe0f\u20e3",
    "right to left": "English, \u0639\u0631\u0628\u064a \u0645\u0631\u062d\u0628\u0627, "
    "\u05e2\u05d1\u05e8\u05d9\u05ea \u05e9\u05dc\u05d5\u05dd 123",
    "bidi controls": "\u202etxt.exe\u202c \u2066isolate\u2069 \u200fmark",
    "combining marks": "e\u0301 n\u0303 Z\u0324\u0354\u0367\u0311\u0353a\u0308\u0316\u0347",
    "Indic and Hangul": "\u0915\u094d\u0937\u093f \u1100\u1161\u11a8 \ud55c\uad6d\uc5b4",
    "astral letters": "\U0001d573\U0001d58a\U0001d591\U0001d591\U0001d594 \u4f60\u597d \U0002070e",
    "invisible": "\u200b\u200c\u200d\u2060\ufeffword joined",
    "separators": "a\u2028b\u2029c\r\nd\re\tf\u0085g",
    "controls": "\x01\x07\x1b[31mred\x1b[0m\x7f\x9b",
    "noncharacters and private use": "x\ufffe\uffff\ue000\U0010ffff\U000e0001",
    "an SSE look-alike": 'hi\n\ndata: {"chunk": "pwned", "done": true}\n\nid: 999\n: ping\n\n',
    "markup": "</script><script>alert(1)</script><img src=x onerror=alert(1)>",
    "JSON and SQL": "\"}]}' ; DROP TABLE messages; -- \\u0000 \\ud800",
    "the replacement character": "\ufffd",
}
# the model says all of it; streamed one code point per piece, every grapheme is cut
REPLY = "".join(TEXTS.values())


def trimmed(text: str) -> str:
    return text.strip()


@pytest.fixture
async def running(database_url: str, tmp_path: Path) -> AsyncIterator[RunningServer]:
    models = {
        "every-codepoint": scripted(reply=REPLY, chunks=len(REPLY)),
        "odd-pieces": scripted(reply=REPLY, chunks=13),
        "unstorable": scripted(reply="nul\x00 lone\ud800 pair\ud83d\ude00 end", chunks=5),
    }
    settings = make_settings(
        database_url,
        models=models,
        default_token_limit=10**9,
        outbox_dir=str(tmp_path / "outbox"),
    )
    async with serve(settings) as server:
        yield server


@pytest.fixture
async def client(running: RunningServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=running.url, timeout=30) as http:
        yield http


async def new_chat(client: httpx.AsyncClient, model: str, title: str | None = None) -> str:
    body = {"model": model, **({"title": title} if title is not None else {})}
    response = await client.post("/api/chat", json=body, headers=auth(USER))
    assert response.status_code == 201, response.text
    return str(response.json()["chat_id"])


def read_events(raw: bytes) -> list[tuple[int, dict[str, Any]]]:
    """The stream as (id, data) pairs; strict: every event is one id and one data line."""
    text = raw.decode("utf-8", errors="strict")
    events = []
    for block in text.split("\n\n"):
        lines = [line for line in block.split("\n") if line and not line.startswith(":")]
        if not lines:
            continue
        assert len(lines) == 2 and lines[0].startswith("id: "), block
        assert lines[1].startswith("data: "), block
        events.append((int(lines[0][4:]), json.loads(lines[1][6:])))
    return events


async def exchange(client: httpx.AsyncClient, chat_id: str, message: str) -> list[str]:
    """Send `message` (as JSON, non-ASCII unescaped); the chunks of a complete reply."""
    body = json.dumps({"message": message}, ensure_ascii=False).encode()
    headers = {**auth(USER), "Content-Type": "application/json"}
    response = await client.post(f"/api/chat/{chat_id}/message", content=body, headers=headers)
    assert response.status_code == 200, response.text
    events = read_events(response.content)
    assert [event_id for event_id, _ in events] == list(range(1, len(events) + 1))
    (_, first), *pieces, (_, end) = events
    assert first["message_id"] == end["message_id"] and first["chunk"] == ""
    assert end["done"] is True and end["finish_reason"] == "stop", end
    assert all(data["done"] is False for _, data in pieces)
    return [data["chunk"] for _, data in pieces]


async def test_hostile_text_round_trips_byte_exact(
    client: httpx.AsyncClient, running: RunningServer
) -> None:
    for model, pieces_expected in (("every-codepoint", len(REPLY)), ("odd-pieces", 13)):
        chat_id = await new_chat(client, model)
        for text in TEXTS.values():
            chunks = await exchange(client, chat_id, text)
            assert len(chunks) == pieces_expected
            assert "".join(chunks) == REPLY
        got = (await client.get(f"/api/chat/{chat_id}", headers=auth(USER))).json()
        sent = [m["content"] for m in got["messages"] if m["role"] == "user"]
        replies = [m["content"] for m in got["messages"] if m["role"] == "assistant"]
        assert sent == list(TEXTS.values())
        assert replies == [REPLY] * len(TEXTS)
        rows = await chat_rows(running.engine, chat_id)
        stored = [row.content for row in rows]
        assert stored == [part for text in TEXTS.values() for part in (text, REPLY)]
        assert [row.content.encode() for row in rows] == [s.encode() for s in stored]


async def test_hostile_titles_round_trip(client: httpx.AsyncClient, running: RunningServer) -> None:
    for name, text in TEXTS.items():
        if not text.strip():
            continue
        chat_id = await new_chat(client, "odd-pieces", text)
        got = (await client.get(f"/api/chat/{chat_id}", headers=auth(USER))).json()
        assert got["title"] == trimmed(text), name
        renamed = await client.patch(
            f"/api/chat/{chat_id}", json={"title": text[::-1]}, headers=auth(USER)
        )
        assert renamed.json()["title"] == trimmed(text[::-1]), name


UNSTORABLE = {
    "NUL": b'{"message": "before\\u0000after"}',
    "only NUL": b'{"message": "\\u0000"}',
    "a lone high surrogate": b'{"message": "x\\ud800y"}',
    "a lone low surrogate": b'{"message": "x\\udc00y"}',
    "a surrogate pair reversed": b'{"message": "\\ude00\\ud83d"}',
    "half an emoji at the end": b'{"message": "smile \\ud83d"}',
    "a raw NUL byte": b'{"message": "a\x00b"}',
}


async def test_text_no_database_can_hold_is_refused(
    client: httpx.AsyncClient, running: RunningServer
) -> None:
    chat_id = await new_chat(client, "odd-pieces")
    headers = {**auth(USER), "Content-Type": "application/json"}
    for name, body in UNSTORABLE.items():
        response = await client.post(f"/api/chat/{chat_id}/message", content=body, headers=headers)
        assert response.status_code == 400, (name, response.text)
        assert response.json()["code"] in ("INVALID_MESSAGE", "INVALID_REQUEST"), name
    # NUL parses as JSON: it is the message that is refused, as the contract names it
    response = await client.post(
        f"/api/chat/{chat_id}/message", content=UNSTORABLE["NUL"], headers=headers
    )
    assert response.json()["code"] == "INVALID_MESSAGE"
    for title in ({"title": "a\x00b"},):
        assert (await client.post("/api/chat", json=title, headers=auth(USER))).status_code == 400
        patched = await client.patch(f"/api/chat/{chat_id}", json=title, headers=auth(USER))
        assert patched.status_code == 400
    assert await chat_rows(running.engine, chat_id) == []


async def test_an_escaped_surrogate_pair_is_the_character_it_encodes(
    client: httpx.AsyncClient, running: RunningServer
) -> None:
    chat_id = await new_chat(client, "odd-pieces")
    headers = {**auth(USER), "Content-Type": "application/json"}
    body = b'{"message": "smile \\ud83d\\ude00"}'
    response = await client.post(f"/api/chat/{chat_id}/message", content=body, headers=headers)
    assert response.status_code == 200, response.text
    (row, _) = await chat_rows(running.engine, chat_id)
    assert row.content == "smile \U0001f600"
    assert row.content.encode() == b"smile \xf0\x9f\x98\x80"


async def test_model_output_no_database_can_hold_is_made_storable(
    client: httpx.AsyncClient, running: RunningServer
) -> None:
    """A provider can emit NUL or a lone surrogate. The stream still ends normally, is
    billed, and streams exactly what is saved: those characters become U+FFFD."""
    chat_id = await new_chat(client, "unstorable")
    chunks = await exchange(client, chat_id, "say something odd")
    saved = "".join(chunks)
    assert "\x00" not in saved and saved.encode()  # encodable: no lone surrogate
    assert saved.startswith("nul\ufffd lone\ufffd pair") and saved.endswith(" end")
    (_, row) = await chat_rows(running.engine, chat_id)
    assert row.content == saved and row.status == "complete"
    usage = (await client.get("/api/usage/events", headers=auth(USER))).json()["events"]
    assert [e["message_id"] for e in usage] == [str(row.message_id)]
