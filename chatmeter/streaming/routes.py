"""POST /api/chat/{chat_id}/message (the stream) and POST /api/chat/{chat_id}/stop."""

from __future__ import annotations

import re
import uuid

from fastapi import APIRouter, Query
from starlette.datastructures import State
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from chatmeter.chats.schemas import NewMessage, StopAccepted
from chatmeter.chats.store import owned_chat_steps, parse_chat_id
from chatmeter.deps import CurrentUser, ServicesDep, current_user
from chatmeter.errors import (
    DATABASE_UNAVAILABLE,
    ApiError,
    database_down_response,
    error_response,
    unexpected_error_response,
)
from chatmeter.jsonutil import BadBody, json_response, parse_json_body
from chatmeter.limits import BodyTooLarge, declared_too_large, read_body, too_large_response
from chatmeter.openapi import (
    CHAT_ID_PARAMETER,
    ChatIdPath,
    error_responses,
    errors,
    event_stream,
    operation,
)
from chatmeter.services import Services
from chatmeter.streaming.exchange import open_exchange
from chatmeter.streaming.jobs import begin_reply, run_reply
from chatmeter.streaming.sse import ReplyStream
from chatmeter.streaming.stopping import stop_chat_reply
from chatmeter.visible import has_visible_text

router = APIRouter(prefix="/api/chat", tags=["stream"])

STREAM_DOC = event_stream(
    "The reply as server-sent events: chunk events, then an end event (or an error event)."
)


def _message(body: object, max_chars: int) -> str:
    if not isinstance(body, dict):
        raise ApiError(400, "INVALID_REQUEST", "the request body must be a JSON object")
    message = body.get("message")
    if not isinstance(message, str) or not has_visible_text(message):
        raise ApiError(400, "INVALID_MESSAGE", "message: a non-blank string is required")
    if len(message) > max_chars:
        raise ApiError(400, "INVALID_MESSAGE", f"message: at most {max_chars} characters")
    if "\x00" in message:
        raise ApiError(400, "INVALID_MESSAGE", "message: must not contain NUL characters")
    return message


MESSAGE_PATH = re.compile(r"/api/chat/([^/]+)/message")


class MessageEndpoint:
    """`POST /api/chat/{chat_id}/message`, served straight from ASGI (see `app.py`).

    Every message takes this path, so it skips FastAPI's routing, middleware and
    dependency machinery: about 0.25 ms of CPU per message, an A/B measured in
    docs/benchmarks-history.md. The checks are the contract's, in
    its order: the body's declared size (413), the token (401), the chat id (400), the
    body (413, 400), then open_exchange's 404, 403 and 409. /openapi.json describes it
    (`OPERATION`)."""

    def __init__(self, state: State, max_body_bytes: int) -> None:
        self._state = state  # the app's: its `services` appear when the app starts
        self._max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send, chat_id: str) -> None:
        try:
            response = await self._respond(scope, receive, chat_id)
        except Exception as exc:
            response = unexpected_error_response(exc)
        await response(scope, receive, send)

    async def _respond(self, scope: Scope, receive: Receive, chat_id: str) -> Response:
        if scope["method"] != "POST":
            return error_response(
                405, "METHOD_NOT_ALLOWED", "Method Not Allowed", {"Allow": "POST"}
            )
        if declared_too_large(scope, self._max_body_bytes):
            return too_large_response(self._max_body_bytes)
        try:
            return await self._send_message(Request(scope, receive), chat_id)
        except ApiError as exc:
            return exc.response()
        except BodyTooLarge:
            return too_large_response(self._max_body_bytes)
        except DATABASE_UNAVAILABLE as exc:
            return database_down_response(exc)

    async def _send_message(self, request: Request, chat_id: str) -> Response:
        services: Services = self._state.services
        user = await current_user(request, services)
        chat_uuid = parse_chat_id(chat_id)
        try:
            body = parse_json_body(
                await read_body(request.receive, self._max_body_bytes),
                request.headers.get("content-type"),
            )
        except BadBody as exc:
            raise ApiError(400, "INVALID_REQUEST", exc.message) from None
        message = _message(body, services.settings.max_message_chars)
        try:
            exchange = await open_exchange(services, user, chat_uuid, message)
        except ApiError as exc:
            if exc.code != "REPLY_IN_PROGRESS" or not await services.replies.sweep_chat(chat_uuid):
                raise
            # the chat was held by the reply of a process that died: settled just now
            exchange = await open_exchange(services, user, chat_uuid, message)
        reply_id = await begin_reply(exchange, services.reply_log)
        services.spawn(run_reply(exchange, services.reply_log))
        on_disconnect = None
        if services.settings.on_disconnect == "stop":
            reservation_id = exchange.reservation.reservation_id

            def on_disconnect() -> None:
                # this reply's, not the chat's: the client may leave after its reply
                # ended and the chat's next one began
                services.replies.stop_local(reservation_id, "interrupted")

        return ReplyStream(
            services.reply_log,
            reply_id,
            ping_interval=services.settings.ping_interval_seconds,
            on_disconnect=on_disconnect,
        )


OPERATION = operation(
    tags=["stream"],
    summary="Send Message",
    description="Send a message; the reply streams back as server-sent events.",
    parameters=[CHAT_ID_PARAMETER],
    request_body=NewMessage,
    responses={"200": STREAM_DOC, **error_responses(400, 403, 404, 409, 429)},
)


@router.post(
    "/{chat_id}/stop",
    status_code=202,
    response_model=StopAccepted,
    responses={202: {"description": "The reply is being stopped."}, **errors(400, 403, 404)},
)
async def stop_reply(chat_id: ChatIdPath, user: CurrentUser, services: ServicesDep) -> Response:
    chat_uuid = parse_chat_id(chat_id)
    if not await stop_chat_reply(services, chat_uuid, user.user_id):
        raise ApiError(404, "NO_ACTIVE_REPLY", "No reply is being generated in this chat.")
    return json_response({"stopping": True, "chat_id": str(chat_uuid)}, 202)


def _last_event_id(request: Request) -> int:
    raw = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
    if raw is None or raw == "":
        return 0
    if not raw.isascii() or not raw.isdigit() or len(raw) > 9:
        raise ApiError(400, "INVALID_REQUEST", "last_event_id: a non-negative integer is required")
    return int(raw)


def _reply_id(request: Request) -> uuid.UUID | None:
    raw = request.query_params.get("message_id")
    if raw is None:
        return None
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise ApiError(400, "INVALID_REQUEST", "message_id: a UUID is required") from None


@router.get(
    "/{chat_id}/stream",
    responses={
        200: event_stream("The reply's events after `Last-Event-ID`, then live ones."),
        204: {"description": "No reply to resume: its messages are in GET /api/chat/{id}."},
        **errors(400, 403, 404),
    },
)
async def resume_reply(
    chat_id: ChatIdPath,
    request: Request,
    user: CurrentUser,
    services: ServicesDep,
    message_id: str | None = Query(default=None, description="the reply; default: the latest"),
    last_event_id: str | None = Query(default=None, description="or the Last-Event-ID header"),
) -> Response:
    """Resume a reply (SPEC section 11): its events after `Last-Event-ID` (header) or
    `?last_event_id=`, with their original ids, then live ones to its end. Never starts
    a generation, never bills."""
    chat_uuid = parse_chat_id(chat_id)
    after = _last_event_id(request)
    wanted = _reply_id(request)
    await services.transactor.run(owned_chat_steps, chat_uuid, user.user_id)
    reply_id = await services.reply_log.current(chat_uuid) if wanted is None else wanted
    if reply_id is None or not await services.reply_log.holds(reply_id, chat_uuid):
        return Response(status_code=204)
    return ReplyStream(
        services.reply_log,
        reply_id,
        after=after,
        ping_interval=services.settings.ping_interval_seconds,
    )
