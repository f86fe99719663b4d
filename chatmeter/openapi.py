"""Helpers that describe hand-parsed bodies and the shared error shape in OpenAPI."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from chatmeter.chats.schemas import ErrorBody


def json_body(model: type[BaseModel], *, required: bool = True) -> dict[str, Any]:
    """`openapi_extra` for an endpoint that reads its JSON body itself (so the order of
    the contract's checks holds: a bad token is 401 before a bad body is 400)."""
    schema = model.model_json_schema()
    return {
        "requestBody": {
            "required": required,
            "content": {"application/json": {"schema": schema}},
        }
    }


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """Document the error answers of an endpoint; all share one shape."""
    return {status: {"model": ErrorBody} for status in (*statuses, 401, 413)}
