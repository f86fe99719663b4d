"""Request and response bodies of the chat endpoints (also the OpenAPI description)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from chatmeter.metering.counting import Source
from chatmeter.visible import has_visible_text


def _clean_title(value: str) -> str:
    value = value.strip()
    if not has_visible_text(value):
        raise ValueError("must not be blank")
    if "\x00" in value:
        raise ValueError("must not contain NUL")
    return value


class NewChat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    title: str | None = Field(default=None, max_length=200)
    model: str | None = Field(default=None, max_length=100)

    @field_validator("title")
    @classmethod
    def _title(cls, value: str | None) -> str | None:
        return None if value is None else _clean_title(value)


class Rename(BaseModel):
    model_config = ConfigDict(extra="forbid")
    title: str = Field(max_length=200)

    @field_validator("title")
    @classmethod
    def _title(cls, value: str) -> str:
        return _clean_title(value)


class NewMessage(BaseModel):
    message: str


# What the API answers. Only the OpenAPI description reads these (the routes write JSON
# themselves); `extra="forbid"` makes the description say no other field appears.


class Chat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    chat_id: uuid.UUID
    title: str
    model: str
    is_active: bool
    created_at: datetime
    updated_at: datetime


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    message_id: uuid.UUID
    role: Literal["user", "assistant"]
    content: str
    tokens_consumed: int = Field(ge=0)
    status: Literal["complete", "stopped", "interrupted", "failed"]
    prompt_tokens: int | None
    completion_tokens: int | None
    metering_source: str | None
    finish_reason: str | None
    cost_micros: int = Field(ge=0, description="millionths of the currency (SPEC section 10)")
    created_at: datetime


class ChatWithMessages(Chat):
    messages: list[Message]


class ChatPage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    chats: list[Chat]
    next: str | None


class ErrorBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    error: Literal[True]
    code: str = Field(pattern="^[A-Z][A-Z0-9_]*$")
    message: str
    resets_at: datetime | None = Field(
        default=None, description="when a spent budget of a plan with a period resets"
    )


class StopAccepted(BaseModel):
    model_config = ConfigDict(extra="forbid")
    stopping: Literal[True]
    chat_id: uuid.UUID


# The `data` of the stream's events (SPEC section 5).


class StreamStart(BaseModel):
    """The first event (id 1): it names the reply, so a client that loses its connection
    knows what to resume (`GET /api/chat/{chat_id}/stream`)."""

    model_config = ConfigDict(extra="forbid")
    chunk: Literal[""]
    done: Literal[False]
    message_id: uuid.UUID
    user_message_id: uuid.UUID


class StreamChunk(BaseModel):
    """A piece of the reply."""

    model_config = ConfigDict(extra="forbid")
    chunk: str = Field(min_length=1)
    done: Literal[False]


class StreamUsage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    thinking_tokens: int = Field(ge=0)
    cached_tokens: int = Field(ge=0)
    total_tokens: int = Field(ge=0)
    source: Source
    cost_micros: int = Field(ge=0, description="millionths of the currency (SPEC section 10)")


class StreamEnd(BaseModel):
    """The last event of a reply that ended (completely, or stopped)."""

    model_config = ConfigDict(extra="forbid")
    chunk: Literal[""]
    done: Literal[True]
    tokens_used: int = Field(ge=0)
    message_id: uuid.UUID
    user_message_id: uuid.UUID
    finish_reason: str
    usage: StreamUsage


class StreamError(BaseModel):
    """The last event of a reply that failed after the stream began."""

    model_config = ConfigDict(extra="forbid")
    error: Literal[True]
    code: Literal[
        "PROVIDER_ERROR",
        "PROVIDER_RATE_LIMITED",
        "PROVIDER_TIMEOUT",
        "CONTENT_BLOCKED",
        "DATABASE_ERROR",
        "INTERNAL_ERROR",
    ]
    message: str
    message_id: uuid.UUID
    tokens_used: int = Field(ge=0)


STREAM_EVENTS: tuple[type[BaseModel], ...] = (StreamStart, StreamChunk, StreamEnd, StreamError)
