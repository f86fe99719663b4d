"""A loopback server that speaks the Gemini API's wire protocol, scriptable per test.

It serves `POST /{v1,v1beta}/models/{model}:streamGenerateContent?alt=sse` (one SSE
`data:` event per GenerateContentResponse, camelCase JSON as the real API sends),
`:generateContent` and `:countTokens`, on 127.0.0.1 in a thread of its own (uvicorn), so
both async tests and sync code can drive it through the real `google-genai` SDK.

    with running_gemini_server() as server:
        server.script = GeminiScript(pieces=["Hel", "lo"], usage="every")
        ...  # point ModelConfig.base_url at server.url; inspect server.requests after

Set `server.script_for` to choose the script per request instead (e.g. from the message).
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from tests.fakes.loopback import LoopbackServer

Json = dict[str, Any]
Scope = dict[str, Any]
Receive = Any
Send = Any

_ROUTE = re.compile(r"^/(?P<version>v1|v1beta)/models/(?P<model>[^/:]+):(?P<action>\w+)$")
_STATUS = {
    400: "INVALID_ARGUMENT",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}


def count_rule(texts: list[str]) -> int:
    """The fake tokenizer: whitespace-separated words of all texts, plus one."""
    return sum(len(text.split()) for text in texts) + 1


@dataclass
class GeminiScript:
    """What the next streams answer. Each reply piece counts as one completion token."""

    pieces: list[str] = field(default_factory=lambda: ["Hello", ", ", "world", "!"])
    delay: float = 0.0  # seconds before each piece but the first
    usage: Literal["last", "every", "none"] = "last"  # "every": cumulative, as Gemini does
    prompt_tokens: int = 11
    cached_tokens: int = 0
    thinking_tokens: int = 0
    thoughts: list[str] = field(default_factory=list)  # thought parts sent before the reply
    finish_reason: str | None = "STOP"  # None: end the stream without one
    # close the connection after this many pieces (uvicorn logs an error about it)
    drop_after: int | None = None
    hang_after: int | None = None  # stop sending (keep the connection) after this many
    error_status: int | None = None  # answer with Gemini's error JSON instead
    block_prompt: str | None = None  # answer promptFeedback.blockReason only
    gated: bool = False  # send each piece but the first only after `release()`


@dataclass
class ReceivedRequest:
    version: str
    model: str
    action: str
    query: str
    headers: dict[str, str]
    body: Json


@dataclass
class StreamRecord:
    """One streamGenerateContent call as the server saw it."""

    request: ReceivedRequest
    sent: int = 0  # reply pieces written (thought parts aside)
    completed: bool = False
    disconnected: threading.Event = field(default_factory=threading.Event)


class GeminiServer(LoopbackServer):
    def __init__(self) -> None:
        super().__init__()
        self.script = GeminiScript()
        # when set, the script of each generate/stream request (instead of `script`)
        self.script_for: Callable[[ReceivedRequest], GeminiScript] | None = None
        self.requests: list[ReceivedRequest] = []
        self.streams: list[StreamRecord] = []
        self.count_calls = 0
        self.count_error_status: int | None = None
        self.count_answer: int | None = None  # every countTokens answers this (a broken proxy)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._gate: asyncio.Semaphore | None = None

    # -- lifecycle -------------------------------------------------------------------

    def reset(self) -> None:
        self.script = GeminiScript()
        self.script_for = None
        self.requests.clear()
        self.streams.clear()
        self.count_calls = 0
        self.count_error_status = None
        self.count_answer = None

    # -- test helpers ----------------------------------------------------------------

    def release(self, pieces: int = 1) -> None:
        """Let a gated stream send `pieces` more pieces."""
        assert self._loop is not None and self._gate is not None, "no gated stream yet"
        for _ in range(pieces):
            self._loop.call_soon_threadsafe(self._gate.release)

    async def wait_disconnected(self, index: int = -1, seconds: float = 5.0) -> bool:
        """Whether the client closed stream `index` (before it completed) within `seconds`."""
        return await asyncio.to_thread(self.streams[index].disconnected.wait, seconds)

    @property
    def last_body(self) -> Json:
        return self.requests[-1].body

    # -- the ASGI app ----------------------------------------------------------------

    async def _app(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        match = _ROUTE.match(scope["path"])
        if scope["method"] != "POST" or match is None:
            await _send_json(send, 404, _error_body(404, f"no route {scope['path']}"))
            return
        raw = b""
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        request = ReceivedRequest(
            version=match["version"],
            model=match["model"],
            action=match["action"],
            query=scope["query_string"].decode(),
            headers={k.decode(): v.decode() for k, v in scope["headers"]},
            body=json.loads(raw or b"{}"),
        )
        self.requests.append(request)
        if request.action == "countTokens":
            await self._count_tokens(request, send)
        elif request.action == "generateContent":
            await self._generate(request, send)
        elif request.action == "streamGenerateContent":
            await self._stream(request, receive, send)
        else:
            await _send_json(send, 404, _error_body(404, f"unknown method {request.action}"))

    async def _count_tokens(self, request: ReceivedRequest, send: Send) -> None:
        self.count_calls += 1
        if self.count_error_status:
            status = self.count_error_status
            await _send_json(send, status, _error_body(status, "counting failed"))
            return
        texts = [
            part.get("text", "")
            for content in request.body.get("contents", [])
            for part in content.get("parts", [])
        ]
        answer = count_rule(texts) if self.count_answer is None else self.count_answer
        await _send_json(send, 200, {"totalTokens": answer})

    def _script(self, request: ReceivedRequest) -> GeminiScript:
        return self.script if self.script_for is None else self.script_for(request)

    async def _generate(self, request: ReceivedRequest, send: Send) -> None:
        script = self._script(request)
        if script.error_status:
            status = script.error_status
            await _send_json(send, status, _error_body(status, "scripted failure"))
            return
        chunks = list(_chunks(script, usage="last"))
        whole = chunks[-1]
        if "candidates" in whole:
            candidates = [c for chunk in chunks for c in chunk["candidates"] if "content" in c]
            parts = [part for c in candidates for part in c["content"]["parts"]]
            whole["candidates"][0]["content"] = {"role": "model", "parts": parts}
        await _send_json(send, 200, whole)

    async def _stream(self, request: ReceivedRequest, receive: Receive, send: Send) -> None:
        script = self._script(request)
        record = StreamRecord(request)
        self.streams.append(record)
        if script.error_status:
            status = script.error_status
            await _send_json(send, status, _error_body(status, "scripted failure"))
            record.completed = True
            return
        if script.gated:
            self._loop = asyncio.get_running_loop()
            self._gate = asyncio.Semaphore(0)

        record.completed = await self.stream_until_gone(
            receive, send, self._send_events(script, record, send), record.disconnected
        )

    async def _send_events(self, script: GeminiScript, record: StreamRecord, send: Send) -> bool:
        """Write the scripted events; False when the script drops the connection."""
        if script.hang_after == 0:
            await asyncio.Event().wait()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        for chunk in _chunks(script, usage=script.usage):
            if _is_piece(chunk):
                if script.drop_after is not None and record.sent >= script.drop_after:
                    return False
                if script.hang_after is not None and record.sent >= script.hang_after:
                    await asyncio.Event().wait()
                if script.gated and record.sent > 0 and self._gate is not None:
                    await self._gate.acquire()
                if script.delay and record.sent > 0:
                    await asyncio.sleep(script.delay)
                record.sent += 1  # counted first, so a client holding the piece sees it
            data = b"data: " + json.dumps(chunk).encode() + b"\r\n\r\n"
            await send({"type": "http.response.body", "body": data, "more_body": True})
        return True


@contextmanager
def running_gemini_server() -> Iterator[GeminiServer]:
    """A started server, stopped on exit: the body of a pytest fixture."""
    server = GeminiServer().start()
    try:
        yield server
    finally:
        server.stop()


def _is_piece(chunk: Json) -> bool:
    return any(
        not part.get("thought")
        for candidate in chunk.get("candidates", [])
        for part in candidate.get("content", {}).get("parts", [])
    )


def _usage(script: GeminiScript, pieces_sent: int) -> Json:
    usage: Json = {
        "promptTokenCount": script.prompt_tokens,
        "candidatesTokenCount": pieces_sent,
        "totalTokenCount": script.prompt_tokens + pieces_sent + script.thinking_tokens,
    }
    if script.thinking_tokens:
        usage["thoughtsTokenCount"] = script.thinking_tokens
    if script.cached_tokens:
        usage["cachedContentTokenCount"] = script.cached_tokens
    return usage


def _chunks(script: GeminiScript, *, usage: str) -> Iterator[Json]:
    """The GenerateContentResponse objects of one stream, in order."""
    if script.block_prompt:
        yield {
            "promptFeedback": {"blockReason": script.block_prompt, "safetyRatings": []},
            "usageMetadata": _usage(script, 0),
            "modelVersion": "fake-gemini",
        }
        return
    parts: list[Json | None] = [{"text": t, "thought": True} for t in script.thoughts]
    parts += [{"text": t} for t in script.pieces]
    if not parts:
        parts = [None]  # a lone final chunk without content (a reply blocked at once)
    sent = 0
    for index, part in enumerate(parts):
        last = index == len(parts) - 1
        candidate: Json = {"index": 0}
        if part is not None:
            candidate["content"] = {"role": "model", "parts": [part]}
            sent += 0 if part.get("thought") else 1
        if last and script.finish_reason:
            candidate["finishReason"] = script.finish_reason
            if script.finish_reason == "SAFETY":
                candidate["safetyRatings"] = [
                    {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH"}
                ]
        chunk: Json = {"candidates": [candidate], "modelVersion": "fake-gemini"}
        if usage == "every" or (usage == "last" and last):
            chunk["usageMetadata"] = _usage(script, sent)
        yield chunk


def _error_body(status: int, message: str) -> Json:
    return {"error": {"code": status, "message": message, "status": _STATUS.get(status, "UNKNOWN")}}


async def _send_json(send: Send, status: int, body: Json) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json; charset=UTF-8"),
                (b"content-length", str(len(data)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})
