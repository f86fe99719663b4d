"""The floor streams what the scripted model streams, framed as chatmeter frames it."""

from __future__ import annotations

import httpx
import orjson

from chatmeter.config import ModelConfig
from chatmeter.providers.scripted import split_into
from chatmeter.streaming.log import encode_piece
from chatmeter.streaming.sse import encode_event
from tools.bench.floor import create_floor_app, floor_path

REPLY = "The floor streams exactly the pieces of the scripted model."


async def test_floor_streams_the_scripted_pieces_with_chatmeter_framing() -> None:
    model = ModelConfig(provider="scripted", reply=REPLY, chunks=5)
    app = create_floor_app({"bench": model})
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://floor") as client:
        answer = await client.post(floor_path("bench", "chat-1"), json={"message": "hi"})
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/event-stream")
    assert answer.headers["cache-control"] == "no-cache"
    events = answer.content.split(b"\n\n")[:-1]
    pieces = split_into(REPLY, 5)
    assert len(events) == len(pieces) + 2
    # the first event names the reply (SPEC section 11), as chatmeter's does
    head, data = events[0].split(b"\n", 1)
    assert head == b"id: 1"
    first = orjson.loads(data.removeprefix(b"data: "))
    assert set(first) == {"chunk", "done", "message_id", "user_message_id"}
    assert first["chunk"] == "" and first["done"] is False
    for index, piece in enumerate(pieces, 2):
        assert events[index - 1] + b"\n\n" == encode_event(index, encode_piece(piece))
    head, data = events[-1].split(b"\n", 1)
    assert head == b"id: %d" % (len(pieces) + 2)
    end = orjson.loads(data.removeprefix(b"data: "))
    assert end["done"] is True and end["chunk"] == "" and end["finish_reason"] == "stop"
    assert (end["message_id"], end["user_message_id"]) == (
        first["message_id"],
        first["user_message_id"],
    )
    assert set(end["usage"]) == {
        "prompt_tokens",
        "completion_tokens",
        "thinking_tokens",
        "cached_tokens",
        "total_tokens",
        "source",
    }


async def test_floor_refuses_an_unknown_model() -> None:
    app = create_floor_app({})
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://floor") as client:
        answer = await client.post(floor_path("nope", "chat-1"), json={"message": "hi"})
    assert answer.status_code == 404
