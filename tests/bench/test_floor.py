"""The floor streams what the scripted model streams, framed as chatmeter frames it."""

from __future__ import annotations

import httpx
import orjson

from chatmeter.bench.floor import create_floor_app, floor_path
from chatmeter.config import ModelConfig
from chatmeter.providers.scripted import split_into
from chatmeter.streaming.sse import encode_event

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
    assert len(events) == len(pieces) + 1
    for index, piece in enumerate(pieces, 1):
        expected = encode_event(index, orjson.dumps({"chunk": piece, "done": False}))
        assert events[index - 1] + b"\n\n" == expected
    head, data = events[-1].split(b"\n", 1)
    assert head == b"id: %d" % (len(pieces) + 1)
    end = orjson.loads(data.removeprefix(b"data: "))
    assert end["done"] is True and end["chunk"] == "" and end["finish_reason"] == "stop"
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
