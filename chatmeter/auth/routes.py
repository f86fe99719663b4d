"""`/api/keys`: a user's API keys (SPEC section 12)."""

from __future__ import annotations

import uuid
from datetime import datetime

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.responses import Response

from chatmeter.auth import key_store
from chatmeter.deps import CurrentUser, ServicesDep
from chatmeter.errors import ApiError
from chatmeter.jsonutil import BadBody, json_response, parse_model, read_json
from chatmeter.openapi import errors, json_body

router = APIRouter(prefix="/api/keys", tags=["keys"])


class NewKey(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(max_length=100)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        value = value.strip()
        if not value or not value.isprintable():
            raise ValueError("a non-blank name of printable characters is required")
        return value


class CreatedKey(BaseModel):
    key_id: uuid.UUID
    name: str
    key: str = Field(description="The secret, shown this once: it is stored only hashed.")
    created_at: datetime


class KeyOut(BaseModel):
    key_id: uuid.UUID
    name: str
    created_at: datetime
    last_used_at: datetime | None = Field(description="Updated at most once a minute.")


class KeyList(BaseModel):
    keys: list[KeyOut]


@router.post(
    "",
    status_code=201,
    response_model=CreatedKey,
    responses=errors(400, 409),
    openapi_extra=json_body(NewKey),
)
async def create_key(request: Request, user: CurrentUser, services: ServicesDep) -> Response:
    try:
        body = parse_model(NewKey, await read_json(request))
    except BadBody as exc:
        raise ApiError(400, "INVALID_REQUEST", exc.message) from None
    created = await services.transactor.run(
        key_store.create_key, services.key_digester, user.user_id, body.name
    )
    return json_response(created, 201)


@router.get("", response_model=KeyList, responses=errors())
async def list_keys(user: CurrentUser, services: ServicesDep) -> Response:
    keys = await services.transactor.run(key_store.list_keys, user.user_id)
    return json_response({"keys": keys})


@router.delete("/{key_id}", status_code=204, responses=errors(400, 404))
async def revoke_key(key_id: str, user: CurrentUser, services: ServicesDep) -> Response:
    try:
        key_uuid = uuid.UUID(key_id)
    except ValueError:
        raise ApiError(400, "INVALID_REQUEST", "key_id: not a valid UUID") from None
    revoked = await services.transactor.run(key_store.revoke_key, user.user_id, key_uuid)
    if not revoked:
        raise ApiError(404, "KEY_NOT_FOUND", "You hold no such key.")
    return Response(status_code=204)
