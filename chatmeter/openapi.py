"""The OpenAPI description: helpers for hand-parsed bodies, the shared error shape and the
event stream, and the finishing touches FastAPI cannot infer (bearer auth; no 422)."""

from __future__ import annotations

from collections.abc import Sequence
from http import HTTPStatus
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Path
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from chatmeter.chats.schemas import STREAM_EVENTS, ErrorBody

COMPONENTS = "#/components/schemas/{model}"
# models whose schemas an operation described by hand refers to, each with its mode
SchemaModels = Sequence[tuple[type[BaseModel], Literal["validation", "serialization"]]]

# A str, not a UUID, to FastAPI: a bad id is the contract's 400 INVALID_CHAT_ID, which the
# route decides, not FastAPI's validation
ChatIdPath = Annotated[
    str, Path(description="The chat's id, a UUID.", json_schema_extra={"format": "uuid"})
]


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
    """Document the error answers of an endpoint; all share one shape. Any of them may
    meet a bad token (401), a body too large (413) or a database that is away (503)."""
    return {status: {"model": ErrorBody} for status in (*statuses, 401, 413, 503)}


CHAT_ID_PARAMETER = {
    "name": "chat_id",
    "in": "path",
    "required": True,
    "description": "The chat's id, a UUID.",
    "schema": {"type": "string", "format": "uuid", "title": "Chat Id"},
}


def error_responses(*statuses: int) -> dict[str, dict[str, Any]]:
    """`errors()` written out, for an operation described by hand (`operation`)."""
    error_body = {"$ref": COMPONENTS.format(model=ErrorBody.__name__)}
    return {
        str(status): {
            "description": HTTPStatus(status).phrase,
            "content": {"application/json": {"schema": error_body}},
        }
        for status in (*statuses, 401, 413, 503)
    }


def operation(
    *,
    tags: list[str],
    summary: str,
    description: str,
    parameters: list[dict[str, Any]],
    request_body: type[BaseModel],
    responses: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """An operation served outside FastAPI's routing (the message route), described by
    hand the way FastAPI describes its own."""
    return {
        "tags": tags,
        "summary": summary,
        "description": description,
        "operationId": summary.lower().replace(" ", "_"),
        "parameters": parameters,
        **json_body(request_body),
        "responses": responses,
    }


def event_stream(description: str) -> dict[str, Any]:
    """A `text/event-stream` answer. As OpenAPI 3.1 tools read it, `schema` describes one
    event: unnamed (so `message`), numbered, and its `data` one JSON object."""
    events = [{"$ref": COMPONENTS.format(model=m.__name__)} for m in STREAM_EVENTS]
    return {
        "description": description,
        "content": {
            "text/event-stream": {
                "schema": {
                    "type": "object",
                    "required": ["data", "id"],
                    "properties": {
                        "event": {"const": "message"},
                        "id": {"type": "string", "pattern": "^[1-9][0-9]*$"},
                        "data": {
                            "type": "string",
                            "contentMediaType": "application/json",
                            "contentSchema": {"oneOf": events},
                        },
                    },
                }
            }
        },
    }


def _finish(
    schema: dict[str, Any], extra: dict[str, dict[str, Any]], extra_models: SchemaModels
) -> dict[str, Any]:
    for path, operations in extra.items():
        schema.setdefault("paths", {}).setdefault(path, {}).update(operations)
    components = schema.setdefault("components", {})
    models = components.setdefault("schemas", {})
    models[ErrorBody.__name__] = ErrorBody.model_json_schema(ref_template=COMPONENTS)
    _, defs = models_json_schema(
        [*((m, "serialization") for m in STREAM_EVENTS), *extra_models], ref_template=COMPONENTS
    )
    models.update(defs.get("$defs", {}))
    # bad requests are 400 INVALID_REQUEST (errors.py): FastAPI's 422 never happens
    models.pop("HTTPValidationError", None)
    models.pop("ValidationError", None)
    components["securitySchemes"] = {
        "bearer": {
            "type": "http",
            "scheme": "bearer",
            "description": "A JWT, or an API key (`cm-…`) made with `POST /api/keys`.",
        }
    }
    for path, operations in schema.get("paths", {}).items():
        for operation in operations.values():
            operation.get("responses", {}).pop("422", None)
            if path.startswith(("/api/", "/v1/")):
                operation["security"] = [{"bearer": []}]
    return schema


def install_openapi(
    app: FastAPI, extra: dict[str, dict[str, Any]], extra_models: SchemaModels = ()
) -> None:
    """Serve the finished description at /openapi.json (built once, on first request).
    `extra` adds operations served outside FastAPI's routing: {path: {method: operation}};
    `extra_models` are the components they refer to."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _finish(
                get_openapi(
                    title=app.title,
                    version=app.version,
                    description=app.description,
                    routes=app.routes,
                ),
                extra,
                extra_models,
            )
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
