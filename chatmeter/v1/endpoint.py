"""`/v1`, served straight from ASGI beside FastAPI (like the message route), so every
answer under it, errors included, is in OpenAI's shape.

A completion is one exchange (`open_prompt_exchange`): the same reservation, provider,
metering, settlement and ledger as a chat's message; this module only translates the
request and the exchange's events. The exchange is bound to this connection: a client
that leaves cancels it, and it is billed what was generated."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from starlette.datastructures import State
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from chatmeter.deps import current_user
from chatmeter.errors import DATABASE_UNAVAILABLE, ApiError
from chatmeter.jsonutil import BadBody, dumps, json_response, parse_json_body
from chatmeter.limits import BodyTooLarge, declared_too_large, read_body
from chatmeter.providers.base import Usage
from chatmeter.services import Services
from chatmeter.streaming.exchange import Exchange, open_prompt_exchange
from chatmeter.v1.errors import (
    OpenAIError,
    bad_request,
    from_api_error,
    from_error_event,
    model_not_found,
    server_error,
)
from chatmeter.v1.request import CompletionRequest, parse_completion_request
from chatmeter.v1.shapes import Completion, finish_reason, model_json, usage_of_event

log = logging.getLogger("chatmeter.v1")

PREFIX = "/v1"
STREAM_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
DONE = b"data: [DONE]\n\n"


def is_v1(path: str) -> bool:
    return path == PREFIX or path.startswith(PREFIX + "/")


class OpenAIEndpoint:
    def __init__(self, state: State, max_body_bytes: int) -> None:
        self._state = state  # the app's: its `services` appear when the app starts
        self._max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            response = await self._respond(scope, receive)
        except OpenAIError as exc:
            response = exc.response()
        except ApiError as exc:
            response = from_api_error(exc).response()
        except BodyTooLarge:
            response = self._too_large()
        except DATABASE_UNAVAILABLE as exc:
            log.warning("database unavailable: %s", type(exc).__name__)
            response = server_error(
                503, "database_error", "The database cannot be reached. Try again shortly."
            ).response()
            response.headers["Retry-After"] = "1"
        except Exception as exc:
            log.error("unexpected error", exc_info=exc)
            response = server_error(
                500, "internal_error", "Something went wrong on our side."
            ).response()
        await response(scope, receive, send)

    def _too_large(self) -> Response:
        return OpenAIError(
            413, f"The body is over {self._max_body_bytes} bytes.", code="request_too_large"
        ).response()

    async def _respond(self, scope: Scope, receive: Receive) -> Response:
        path, method = scope["path"].rstrip("/"), scope["method"]
        request = Request(scope, receive)
        if path == "/v1/chat/completions":
            _allow(method, "POST")
            if declared_too_large(scope, self._max_body_bytes):
                return self._too_large()
            return await self._complete(request)
        if path == "/v1/models" or path.startswith("/v1/models/"):
            _allow(method, "GET")
            await current_user(request, self._services)
            return self._models(path.removeprefix("/v1/models").lstrip("/"))
        raise OpenAIError(
            404, f"Unknown request URL: {method} {scope['path']}.", code="unknown_url"
        )

    @property
    def _services(self) -> Services:
        services: Services = self._state.services
        return services

    def _models(self, name: str) -> Response:
        providers = self._services.providers
        if not name:
            return json_response(
                {"object": "list", "data": [model_json(n) for n in providers.names()]}
            )
        if not providers.has(name):
            raise model_not_found(name)
        return json_response(model_json(name))

    async def _complete(self, request: Request) -> Response:
        services = self._services
        user = await current_user(request, services)
        try:
            body = parse_json_body(
                await read_body(request.receive, self._max_body_bytes),
                request.headers.get("content-type"),
            )
        except BadBody as exc:
            raise bad_request(exc.message, exc.field) from None
        asked = parse_completion_request(body)
        if not services.providers.has(asked.prompt.model):
            raise model_not_found(asked.prompt.model)
        exchange = await open_prompt_exchange(services, user, asked.prompt)
        completion = Completion(
            f"chatcmpl-{exchange.message_id.hex}", int(time.time()), asked.prompt.model
        )
        if asked.stream:
            return CompletionStream(exchange, completion, asked)
        return await _bound_to_client(request.receive, _whole(exchange, completion))


def _allow(method: str, allowed: str) -> None:
    if method != allowed:
        raise OpenAIError(
            405,
            f"Method {method} is not allowed here: use {allowed}.",
            code="method_not_allowed",
            headers={"Allow": allowed},
        )


async def _bound_to_client(receive: Receive, work: Any) -> Response:
    """Await `work`, cancelling it if the client goes away (the exchange then settles
    what was generated as interrupted); the answer is then one nobody reads."""
    task: asyncio.Task[Response] = asyncio.ensure_future(work)
    gone = False

    async def watch() -> None:
        nonlocal gone
        while (await receive())["type"] != "http.disconnect":
            pass
        gone = True
        task.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        return await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if not gone or (current is not None and current.cancelling()):
            raise  # this request itself is cancelled (a server shutdown): pass it on
        # the client left: not an error of the application's (uvicorn logs one at
        # ERROR, with a traceback, for an exception it is handed)
        return Response(status_code=499)
    finally:
        watcher.cancel()


async def _whole(exchange: Exchange, completion: Completion) -> Response:
    pieces: list[str] = []
    finish, usage = "stop", Usage(0, 0)
    events = exchange.events()
    try:
        async for event in events:
            if event.get("error"):
                if event["code"] != "CONTENT_BLOCKED":
                    raise from_error_event(event)
                finish, usage = "content_filter", _billed(exchange)
            elif event.get("done"):
                finish, usage = finish_reason(event["finish_reason"]), usage_of_event(event)
            else:
                pieces.append(event["chunk"])
    finally:
        await events.aclose()
        await exchange.close_unstarted()
    return json_response(completion.whole("".join(pieces), finish, usage))


class CompletionStream(Response):
    """`chat.completion.chunk` events, then the usage chunk when asked, then `[DONE]`.
    A failure after the stream began is an `{"error": …}` event, which the OpenAI SDKs
    raise; no `[DONE]` follows it."""

    def __init__(self, exchange: Exchange, completion: Completion, asked: CompletionRequest):
        # no super().__init__: this response writes its own start and body
        self.status_code = 200
        self.background = None
        self._exchange = exchange
        self._completion = completion
        self._include_usage = asked.include_usage

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
        gone = False

        async def watch() -> None:
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            gone = True
            task.cancel()

        events = self._exchange.events()
        watcher = asyncio.ensure_future(watch())
        try:
            await send({"type": "http.response.start", "status": 200, "headers": STREAM_HEADERS})
            async for frame in self._frames(events):
                await send({"type": "http.response.body", "body": frame, "more_body": True})
            watcher.cancel()
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not gone:
                raise  # not the client leaving (a server shutdown): pass it on
            task.uncancel()  # the client left; the exchange billed what was generated
        except OSError:
            pass  # the connection closed under a send: the same as leaving
        finally:
            watcher.cancel()
            with contextlib.suppress(Exception):
                await events.aclose()
            await self._exchange.close_unstarted()

    async def _frames(self, events: AsyncGenerator[dict[str, Any], None]) -> AsyncIterator[bytes]:
        completion, with_usage = self._completion, self._include_usage
        yield _frame(
            completion.chunk({"role": "assistant", "content": ""}, None, with_usage=with_usage)
        )
        finish, usage = "stop", Usage(0, 0)
        async for event in events:
            if event.get("error"):
                if event["code"] != "CONTENT_BLOCKED":
                    yield _frame(from_error_event(event).body())
                    return
                finish, usage = "content_filter", _billed(self._exchange)
            elif event.get("done"):
                finish, usage = finish_reason(event["finish_reason"]), usage_of_event(event)
            elif event["chunk"]:
                yield _frame(
                    completion.chunk({"content": event["chunk"]}, None, with_usage=with_usage)
                )
        yield _frame(completion.chunk({}, finish, with_usage=with_usage))
        if with_usage:
            yield _frame(completion.usage_chunk(usage))
        yield DONE


def _billed(exchange: Exchange) -> Usage:
    """What a blocked reply was billed (its error event carries only the total)."""
    return exchange.billed.usage if exchange.billed is not None else Usage(0, 0)


def _frame(data: dict[str, Any]) -> bytes:
    return b"data: %s\n\n" % dumps(data)
