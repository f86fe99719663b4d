"""POST /api/chat/{chat_id}/message (the stream) and POST /api/chat/{chat_id}/stop."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Request
from starlette.responses import Response

from chatmeter.chats.schemas import NewMessage, StopAccepted
from chatmeter.chats.store import owned_chat_steps, parse_chat_id
from chatmeter.db.steps import Steps
from chatmeter.db.tables import utcnow
from chatmeter.deps import CurrentUser, ServicesDep
from chatmeter.errors import ApiError
from chatmeter.jsonutil import BadBody, json_response, read_json
from chatmeter.metering.budget import request_stop
from chatmeter.openapi import ChatIdPath, errors, event_stream, json_body
from chatmeter.streaming.exchange import open_exchange
from chatmeter.streaming.sse import EventStream

router = APIRouter(prefix="/api/chat", tags=["stream"])

STREAM_DOC = event_stream(
    "The reply as server-sent events: chunk events, then an end event (or an error event)."
)


def _message(body: object, max_chars: int) -> str:
    if not isinstance(body, dict):
        raise ApiError(400, "INVALID_REQUEST", "the request body must be a JSON object")
    message = body.get("message")
    if not isinstance(message, str) or not message.strip():
        raise ApiError(400, "INVALID_MESSAGE", "message: a non-blank string is required")
    if len(message) > max_chars:
        raise ApiError(400, "INVALID_MESSAGE", f"message: at most {max_chars} characters")
    if "\x00" in message:
        raise ApiError(400, "INVALID_MESSAGE", "message: must not contain NUL characters")
    return message


@router.post(
    "/{chat_id}/message",
    response_class=Response,
    responses={200: STREAM_DOC, **errors(400, 403, 404, 409)},
    openapi_extra=json_body(NewMessage),
)
async def send_message(
    chat_id: ChatIdPath, request: Request, user: CurrentUser, services: ServicesDep
) -> Response:
    chat_uuid = parse_chat_id(chat_id)
    try:
        body = await read_json(request)
    except BadBody as exc:
        raise ApiError(400, "INVALID_REQUEST", exc.message) from None
    message = _message(body, services.settings.max_message_chars)
    exchange = await open_exchange(services, user, chat_uuid, message)
    return EventStream(
        exchange.events(),
        ping_interval=services.settings.ping_interval_seconds,
        on_close=exchange.close_unstarted,
    )


def _flag_stop(chat_id: uuid.UUID, user_id: str) -> Steps[str | None]:
    yield from owned_chat_steps(chat_id, user_id)
    return (yield from request_stop(chat_id, utcnow()))


@router.post(
    "/{chat_id}/stop",
    status_code=202,
    response_model=StopAccepted,
    responses={202: {"description": "The reply is being stopped."}, **errors(400, 403, 404)},
)
async def stop_reply(chat_id: ChatIdPath, user: CurrentUser, services: ServicesDep) -> Response:
    chat_uuid = parse_chat_id(chat_id)
    # the flag is set in the database too: the holder may be another worker
    holder = await services.transactor.run(lambda: _flag_stop(chat_uuid, user.user_id))
    if holder is None:
        raise ApiError(404, "NO_ACTIVE_REPLY", "No reply is being generated in this chat.")
    services.replies.stop_local(chat_uuid)
    return json_response({"stopping": True, "chat_id": str(chat_uuid)}, 202)
