"""JSON in and out with orjson: one place, so every answer serialises the same way."""

from __future__ import annotations

import json
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


def is_json_media_type(content_type: str) -> bool:
    media_type = content_type.partition(";")[0].strip().lower()
    return media_type == "application/json" or (
        media_type.startswith("application/") and media_type.endswith("+json")
    )


def _refuse_repeated_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    value = dict(pairs)
    if len(value) != len(pairs):
        raise BadBody("the request body repeats a key")
    return value


async def read_json(request: Request) -> Any:
    return parse_json_body(await request.body(), request.headers.get("content-type"))


def parse_json_body(body: bytes, content_type: str | None) -> Any:
    """A request body as JSON; BadBody says what is wrong with it."""
    if not body:
        raise BadBody("the request body must be a JSON object")
    # no Content-Type at all is taken as JSON (bare HTTP clients send none); a
    # form or text body is refused rather than guessed at
    if content_type is not None and not is_json_media_type(content_type):
        raise BadBody("send the body as Content-Type: application/json")
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadBody("the request body is not valid JSON") from None
    if b"{" in body:
        # orjson keeps the last of repeated keys, other parsers the first: a body that
        # means different things to different readers (a proxy, a log) is refused
        try:
            json.loads(body, object_pairs_hook=_refuse_repeated_keys)
        except (ValueError, RecursionError):
            raise BadBody("the request body is not valid JSON") from None
    return value


def parse_model(model: type[ModelT], value: Any) -> ModelT:
    if not isinstance(value, dict):
        raise BadBody("the request body must be a JSON object")
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(str(p) for p in error["loc"]) or None
        raise BadBody(f"{field}: {error['msg']}" if field else error["msg"], field) from None
