"""`/v1` in the OpenAPI description (SPEC section 12). Only the description reads these:
the endpoint parses requests by hand (`request.py`) and writes answers itself
(`shapes.py`). A request may carry fields not listed here (they are ignored), so request
bodies allow extra fields; answers carry exactly the fields listed."""

from __future__ import annotations

from collections.abc import Sequence
from http import HTTPStatus
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from chatmeter.openapi import COMPONENTS, SchemaModels


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text"]
    text: str


class CompletionMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user"]
    content: str | list[TextPart] = Field(description="Text, or text parts joined.")


class CompletionAssistantMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["assistant"]
    content: str | list[TextPart] | None = None


class CompletionStreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool | None = None


StopSequence = Annotated[str, Field(min_length=1)]


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1, description="A configured model (`GET /v1/models`).")
    messages: list[CompletionMessage | CompletionAssistantMessage] = Field(
        min_length=1, description="The conversation; the last one must be the user's."
    )
    stream: bool | None = None
    stream_options: CompletionStreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2, description="Passed on.")
    top_p: float | None = Field(default=None, ge=0, le=1, description="Passed on.")
    stop: StopSequence | Annotated[list[StopSequence], Field(max_length=4)] | None = Field(
        default=None, description="Passed on: one stop sequence or up to 4."
    )
    n: Literal[1] | None = Field(default=None, description="Only one choice is supported.")


class PromptTokensDetails(BaseModel):
    model_config = ConfigDict(extra="forbid")
    cached_tokens: int = Field(ge=0)


class CompletionTokensDetails(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reasoning_tokens: int = Field(ge=0)


class CompletionUsage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0, description="Thinking included.")
    total_tokens: int = Field(ge=0)
    prompt_tokens_details: PromptTokensDetails
    completion_tokens_details: CompletionTokensDetails


FinishReason = Literal["stop", "length", "content_filter"]


class AssistantMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["assistant"]
    content: str
    refusal: None


class CompletionChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    index: Literal[0]
    message: AssistantMessage
    logprobs: None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: None
    choices: list[CompletionChoice]
    usage: CompletionUsage


class ChunkDelta(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    index: Literal[0]
    delta: ChunkDelta
    logprobs: None
    finish_reason: FinishReason | None


class ChatCompletionChunk(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    system_fingerprint: None
    choices: list[ChunkChoice] = Field(description="Empty in the last chunk, with usage.")
    usage: CompletionUsage | None = Field(
        default=None, description="Only with `stream_options.include_usage`."
    )


class OpenAIErrorDetail(BaseModel):
    model_config = ConfigDict(extra="forbid")
    message: str
    type: str
    code: str | None
    param: str | None


class OpenAIErrorBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    error: OpenAIErrorDetail


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class OpenAIModelList(BaseModel):
    model_config = ConfigDict(extra="forbid")
    object: Literal["list"]
    data: list[OpenAIModel]


# (model, mode) for `pydantic.json_schema.models_json_schema`: their components
V1_MODELS: SchemaModels = [
    (CompletionRequest, "validation"),
    (ChatCompletion, "serialization"),
    (ChatCompletionChunk, "serialization"),
    (OpenAIErrorBody, "serialization"),
    (OpenAIModelList, "serialization"),
]


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": COMPONENTS.format(model=model.__name__)}


def _json(model: type[BaseModel]) -> dict[str, Any]:
    return {"application/json": {"schema": _ref(model)}}


def _errors(*statuses: int) -> dict[str, dict[str, Any]]:
    """Every error under /v1 is in OpenAI's shape; any may meet a bad key (401) or a
    database that is away (503)."""
    return {
        str(status): {"description": HTTPStatus(status).phrase, "content": _json(OpenAIErrorBody)}
        for status in sorted({*statuses, 401, 503})
    }


_CHUNK_EVENTS = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "event": {"const": "message"},
        "data": {
            "anyOf": [
                {"const": "[DONE]", "description": "The end of a stream that did not fail."},
                {
                    "type": "string",
                    "contentMediaType": "application/json",
                    "contentSchema": {"anyOf": [_ref(ChatCompletionChunk), _ref(OpenAIErrorBody)]},
                },
            ]
        },
    },
}


def _completions(models: dict[str, Any]) -> dict[str, Any]:
    request = {"allOf": [_ref(CompletionRequest), {"properties": {"model": models}}]}
    return {
        "tags": ["openai"],
        "summary": "Create chat completion",
        "description": (
            "OpenAI's Chat Completions protocol: one metered, budgeted exchange. With "
            "`stream` the answer is `chat.completion.chunk` events then `data: [DONE]` (a "
            "failure after the stream began is an `{error}` event instead). Tools, images "
            "and `n > 1` are 400."
        ),
        "operationId": "create_chat_completion",
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": request}},
        },
        "responses": {
            "200": {
                "description": "The completion, or its chunks when `stream` is true.",
                "content": {
                    **_json(ChatCompletion),
                    "text/event-stream": {"schema": _CHUNK_EVENTS},
                },
            },
            **_errors(400, 403, 404, 413, 429, 502, 503, 504),
        },
    }


_MODELS = {
    "tags": ["openai"],
    "summary": "List models",
    "description": "The configured models, in OpenAI's shape.",
    "operationId": "list_models_openai",
    "responses": {
        "200": {"description": "The models.", "content": _json(OpenAIModelList)},
        **_errors(),
    },
}


def _model(models: dict[str, Any]) -> dict[str, Any]:
    return {
        "tags": ["openai"],
        "summary": "Retrieve model",
        "description": "One configured model, in OpenAI's shape.",
        "operationId": "retrieve_model_openai",
        "parameters": [{"name": "model", "in": "path", "required": True, "schema": models}],
        "responses": {
            "200": {"description": "The model.", "content": _json(OpenAIModel)},
            **_errors(404),
        },
    }


def v1_operations(model_names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The operations of `/v1`, for this server's configured models (any other is 404
    `model_not_found`)."""
    models = {"type": "string", "enum": list(model_names), "title": "Model"}
    return {
        "/v1/chat/completions": {"post": _completions(models)},
        "/v1/models": {"get": _MODELS},
        "/v1/models/{model}": {"get": _model(models)},
    }
