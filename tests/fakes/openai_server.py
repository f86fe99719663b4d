"""A loopback server that speaks the OpenAI Chat Completions wire protocol, scriptable per
test, the way OpenAI and llama.cpp's server answer.

It serves `POST /v1/chat/completions` with `stream: true` (a role chunk, one chunk per
content piece, a finish chunk, then — when `stream_options.include_usage` is asked — a
usage chunk with `choices: []`, then `data: [DONE]`) and llama.cpp's `POST /tokenize`, on
127.0.0.1 in a thread of its own (uvicorn), so the real `openai` SDK can drive it.

    server = OpenAIServer().start()
    server.script = OpenAIScript(pieces=["Hel", "lo"], reasoning_tokens=5)
    ...  # point ModelConfig.base_url at server.base_url
    server.stop()
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from tests.fakes.loopback import LoopbackServer

Json = dict[str, Any]
Scope = dict[str, Any]
Receive = Any
Send = Any

_ERRORS: dict[int, Json] = {
    # OpenAI's own error bodies for these statuses
    429: {
        "message": "Rate limit reached for gpt-4o-mini on tokens per min (TPM): Limit 200000.",
        "type": "tokens",
        "param": None,
        "code": "rate_limit_exceeded",
    },
    500: {
        "message": "The server had an error while processing your request. Sorry about that!",
        "type": "server_error",
        "param": None,
        "code": None,
    },
}


def fake_token_count(text: str) -> int:
    """The fake tokenizer behind `/tokenize`: one token per whitespace-separated word."""
    return len(text.split())


@dataclass
class OpenAIScript:
    """What the next streams answer. Each piece counts as one completion token unless
    `completion_tokens` says otherwise."""

    pieces: list[str] = field(default_factory=lambda: ["Hello", ", ", "world", "!"])
    delay: float = 0.0  # seconds before each piece
    finish_reason: str | None = "stop"
    usage: bool = True  # send the usage chunk when the request asks for it
    prompt_tokens: float = 11  # a float too: what a broken upstream may send
    completion_tokens: int | None = None  # None: one per piece
    reasoning_tokens: int | None = None  # completion_tokens_details.reasoning_tokens
    cached_tokens: int = 0
    drop_after: int | None = None  # cut the connection after this many pieces
    hang_after: int | None = None  # stop sending (keep the connection) after this many
    error_after: int | None = None  # send llama.cpp's in-stream error event after this many
    hang: bool = False  # never answer at all (no status line)
    error_status: int | None = None  # answer with OpenAI's error JSON instead
    tokenize: bool = True  # whether `/tokenize` exists (404 otherwise)
    # a second choice (index 1) before the first in every chunk, as a server that ignores
    # `n` (or answers several) may send: never part of the reply
    other_choice: str | None = None
    # each choice without its `index`, as some OpenAI-compatible servers send a lone one
    choice_index: bool = True


@dataclass
class ReceivedRequest:
    path: str
    headers: dict[str, str]
    body: Json


@dataclass
class StreamRecord:
    """One chat completion call as the server saw it."""

    request: ReceivedRequest
    sent: int = 0  # content pieces written
    completed: bool = False
    disconnected: threading.Event = field(default_factory=threading.Event)


class OpenAIServer(LoopbackServer):
    def __init__(self) -> None:
        super().__init__()
        self.script = OpenAIScript()
        self.requests: list[ReceivedRequest] = []
        self.streams: list[StreamRecord] = []
        self.tokenized: list[str] = []

    @property
    def base_url(self) -> str:
        """What an OpenAI client takes as `base_url`."""
        return f"{self.url}/v1"

    # -- lifecycle -------------------------------------------------------------------

    def reset(self) -> None:
        self.script = OpenAIScript()
        self.requests.clear()
        self.streams.clear()
        self.tokenized.clear()

    # -- test helpers ----------------------------------------------------------------

    async def wait_disconnected(self, index: int = -1, within: float = 5.0) -> bool:
        """Whether the client closed stream `index` (before it completed) within `within`
        seconds."""
        return await asyncio.to_thread(self.streams[index].disconnected.wait, within)

    @property
    def last_body(self) -> Json:
        return self.requests[-1].body

    # -- the ASGI app ----------------------------------------------------------------

    async def _app(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        raw = b""
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        request = ReceivedRequest(
            path=scope["path"],
            headers={k.decode(): v.decode() for k, v in scope["headers"]},
            body=json.loads(raw or b"{}"),
        )
        self.requests.append(request)
        route = (scope["method"], request.path)
        if route == ("POST", "/v1/chat/completions"):
            await self._chat(request, receive, send)
        elif route == ("POST", "/tokenize") and self.script.tokenize:
            self.tokenized.append(request.body["content"])
            tokens = list(range(fake_token_count(request.body["content"])))
            await _send_json(send, 200, {"tokens": tokens})
        else:
            # llama.cpp's 404 body
            error = {"code": 404, "message": "File Not Found", "type": "not_found_error"}
            await _send_json(send, 404, {"error": error})

    async def _chat(self, request: ReceivedRequest, receive: Receive, send: Send) -> None:
        script = self.script
        record = StreamRecord(request)
        self.streams.append(record)
        if script.error_status:
            status = script.error_status
            await _send_json(send, status, {"error": _ERRORS[status]})
            record.completed = True
            return

        record.completed = await self.stream_until_gone(
            receive, send, self._send_events(script, record, send), record.disconnected
        )

    async def _send_events(self, script: OpenAIScript, record: StreamRecord, send: Send) -> bool:
        """Write the scripted stream; False when the script drops the connection."""
        if script.hang:
            await asyncio.Event().wait()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        include_usage = bool(record.request.body.get("stream_options", {}).get("include_usage"))
        model = record.request.body.get("model", "")
        for kind, chunk in _chunks(script, model=model, include_usage=include_usage):
            if kind == "piece":
                sent = record.sent
                if script.drop_after is not None and sent >= script.drop_after:
                    return False
                if script.hang_after is not None and sent >= script.hang_after:
                    await asyncio.Event().wait()
                if script.error_after is not None and sent >= script.error_after:
                    error = {"code": 500, "message": "Context size has been exceeded."}
                    await _send_event(send, {"error": {**error, "type": "server_error"}})
                    return True
                if script.delay:
                    await asyncio.sleep(script.delay)
            await _send_event(send, chunk)
            if kind == "piece":
                record.sent += 1
        await _send_event(send, "[DONE]")
        return True


def _chunks(script: OpenAIScript, *, model: str, include_usage: bool) -> Iterator[tuple[str, Json]]:
    """The chat.completion.chunk objects of one stream, in order, each tagged with its kind."""
    base: Json = {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": "fp_fake",
    }
    if include_usage:
        base["usage"] = None  # OpenAI sends an explicit null on every chunk but the last

    def chunk(delta: Json, finish_reason: str | None = None) -> Json:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        if not script.choice_index:
            del choice["index"]
        if script.other_choice is None:
            return {**base, "choices": [choice]}
        other = {**choice, "index": 1, "delta": {"content": script.other_choice}}
        return {**base, "choices": [other, choice]}

    yield "role", chunk({"role": "assistant", "content": "", "refusal": None})
    for piece in script.pieces:
        yield "piece", chunk({"content": piece})
    if script.finish_reason is not None:
        yield "finish", chunk({}, script.finish_reason)
    if include_usage and script.usage:
        yield "usage", {**base, "choices": [], "usage": _usage(script)}


def _usage(script: OpenAIScript) -> Json:
    completion = script.completion_tokens
    if completion is None:
        completion = len(script.pieces)
    usage: Json = {
        "prompt_tokens": script.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": script.prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": script.cached_tokens, "audio_tokens": 0},
    }
    if script.reasoning_tokens is not None:
        usage["completion_tokens_details"] = {
            "reasoning_tokens": script.reasoning_tokens,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        }
    return usage


async def _send_event(send: Send, data: Json | str) -> None:
    text = data if isinstance(data, str) else json.dumps(data)
    body = f"data: {text}\n\n".encode()
    await send({"type": "http.response.body", "body": body, "more_body": True})


async def _send_json(send: Send, status: int, body: Json) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})
