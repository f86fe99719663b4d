"""The chat endpoints: thin, they parse, check ownership and call the store."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from chatmeter.chats import store
from chatmeter.chats.schemas import Chat, ChatPage, ChatWithMessages, NewChat, Rename
from chatmeter.deps import CurrentUser, ServicesDep
from chatmeter.errors import ApiError
from chatmeter.jsonutil import BadBody, json_response, parse_model, read_json
from chatmeter.openapi import ChatIdPath, errors, json_body
from chatmeter.streaming.stopping import delete_chat_and_stop_reply

router = APIRouter(prefix="/api/chat", tags=["chats"])


async def _body(request: Request, model: type[Any], *, optional: bool = False) -> Any:
    try:
        if optional and not await request.body():
            return model()
        return parse_model(model, await read_json(request))
    except BadBody as exc:
        raise ApiError(400, "INVALID_REQUEST", exc.message) from None


@router.post(
    "",
    status_code=201,
    response_model=Chat,
    responses=errors(400),
    openapi_extra=json_body(NewChat, required=False),
)
async def create_chat(request: Request, user: CurrentUser, services: ServicesDep) -> Response:
    body: NewChat = await _body(request, NewChat, optional=True)
    # only an absent (or null) model means the default: "" is a model nobody configured
    model = services.settings.default_model if body.model is None else body.model
    if not services.providers.has(model):
        known = ", ".join(services.providers.names())
        raise ApiError(400, "INVALID_REQUEST", f"model: unknown model {model!r} (known: {known})")
    chat = await services.transactor.run(
        store.insert_chat, user.user_id, body.title or "New chat", model
    )
    return json_response(chat.json(), 201)


@router.get("", response_model=ChatPage, responses=errors(400))
async def list_chats(
    user: CurrentUser,
    services: ServicesDep,
    limit: int = Query(default=20, ge=1, le=100),
    before: str | None = Query(default=None, max_length=200),
) -> Response:
    cursor = store.decode_cursor(before) if before else None
    chats, following = await services.transactor.run(store.list_chats, user.user_id, limit, cursor)
    return json_response({"chats": chats, "next": following})


@router.get("/{chat_id}", response_model=ChatWithMessages, responses=errors(400, 403, 404))
async def get_chat(chat_id: ChatIdPath, user: CurrentUser, services: ServicesDep) -> Response:
    chat_uuid = store.parse_chat_id(chat_id)
    chat = await services.transactor.run(store.chat_with_messages, chat_uuid, user.user_id)
    return json_response(chat)


@router.patch(
    "/{chat_id}",
    response_model=Chat,
    responses=errors(400, 403, 404),
    openapi_extra=json_body(Rename),
)
async def rename_chat(
    chat_id: ChatIdPath, request: Request, user: CurrentUser, services: ServicesDep
) -> Response:
    chat_uuid = store.parse_chat_id(chat_id)
    body: Rename = await _body(request, Rename)
    chat = await services.transactor.run(store.rename_chat, chat_uuid, user.user_id, body.title)
    return json_response(chat.json())


@router.delete("/{chat_id}", status_code=204, responses=errors(400, 403, 404))
async def delete_chat(chat_id: ChatIdPath, user: CurrentUser, services: ServicesDep) -> Response:
    chat_uuid = store.parse_chat_id(chat_id)
    # its reply, if one streams, is stopped too (saved, billed, released)
    await delete_chat_and_stop_reply(services, chat_uuid, user.user_id)
    return Response(status_code=204)
