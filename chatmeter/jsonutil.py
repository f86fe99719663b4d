"""JSON in and out with orjson: one place, so every answer serialises the same way."""

from __future__ import annotations

from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response

ModelT = TypeVar("ModelT", bound=BaseModel)


def dumps(value: Any) -> bytes:
    return orjson.dumps(value)


def json_response(value: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(value), status_code=status, media_type="application/json")


class BadBody(Exception):
    """The body is not JSON, or not the expected object. `field` names the first bad field."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


async def read_json(request: Request) -> Any:
    body = await request.body()
    if not body:
        raise BadBody("the request body must be a JSON object")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadBody("the request body is not valid JSON") from None


def parse_model(model: type[ModelT], value: Any) -> ModelT:
    if not isinstance(value, dict):
        raise BadBody("the request body must be a JSON object")
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(str(p) for p in error["loc"]) or None
        raise BadBody(f"{field}: {error['msg']}" if field else error["msg"], field) from None
