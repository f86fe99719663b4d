"""The floor: a bare Starlette SSE endpoint that streams what a `scripted` model streams.

Same pieces, same pacing (`delay_ms` before each piece), same event framing
(`id: N\\ndata: {json}\\n\\n`), a first event naming the reply and an end event of the
same shapes as chatmeter's (SPEC sections 5 and 11), served by
the same uvicorn settings (uvloop, httptools, one worker) -- but no auth, no database and
no metering. What chatmeter costs beyond this is what chatmeter adds.

    python -m tools.bench.floor --port 8001    # models from CHATMETER_CONFIG

`POST /floor/{model}/{chat_id}/message` streams the model named in the path."""

from __future__ import annotations

import argparse
import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from chatmeter.config import ModelConfig, load_settings
from chatmeter.providers.scripted import scripted_count, split_into

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def floor_path(model: str, chat_id: str) -> str:
    return f"/floor/{model}/{chat_id}/message"


def _event(event_id: int, data: dict[str, Any]) -> bytes:
    return b"id: %d\ndata: %s\n\n" % (event_id, orjson.dumps(data))


def _first_event(message_id: str, user_message_id: str) -> dict[str, Any]:
    return {
        "chunk": "",
        "done": False,
        "message_id": message_id,
        "user_message_id": user_message_id,
    }


def _end_event(message: str, reply: str, message_id: str, user_message_id: str) -> dict[str, Any]:
    prompt, completion = scripted_count(message), scripted_count(reply)
    return {
        "chunk": "",
        "done": True,
        "tokens_used": prompt + completion,
        "message_id": message_id,
        "user_message_id": user_message_id,
        "finish_reason": "stop",
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "thinking_tokens": 0,
            "cached_tokens": 0,
            "total_tokens": prompt + completion,
            "source": "provider",
        },
    }


def create_floor_app(models: dict[str, ModelConfig]) -> Starlette:
    scripts = {
        name: (config.reply, split_into(config.reply, config.chunks), config.delay_ms / 1000)
        for name, config in models.items()
        if config.provider == "scripted"
    }

    async def stream(request: Request) -> Response:
        script = scripts.get(request.path_params["model"])
        if script is None:
            return JSONResponse({"error": True, "code": "NOT_FOUND"}, 404)
        body = orjson.loads(await request.body())
        reply, pieces, delay = script

        async def events() -> AsyncIterator[bytes]:
            ids = str(uuid.uuid4()), str(uuid.uuid4())
            yield _event(1, _first_event(*ids))
            for event_id, piece in enumerate(pieces, 2):
                if delay:
                    await asyncio.sleep(delay)
                yield _event(event_id, {"chunk": piece, "done": False})
            end = _end_event(str(body.get("message", "")), reply, *ids)
            yield _event(len(pieces) + 2, end)

        return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)

    async def healthz(_: Request) -> Response:
        return JSONResponse({"status": "ok"})

    return Starlette(
        routes=[
            Route("/floor/{model}/{chat_id}/message", stream, methods=["POST"]),
            Route("/healthz", healthz),
        ]
    )


def create_floor_app_from_env() -> Starlette:
    """The floor as `uvicorn --factory` builds it: the models of CHATMETER_CONFIG."""
    return create_floor_app(load_settings().models)


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    # the settings of `chatmeter serve`, so only the application differs
    uvicorn.run(
        "tools.bench.floor:create_floor_app_from_env",
        factory=True,
        host=args.host,
        port=args.port,
        workers=1,
        loop="uvloop",
        http="httptools",
        log_level="info",
        access_log=False,
        timeout_graceful_shutdown=30,
    )


if __name__ == "__main__":
    main()
