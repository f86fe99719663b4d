"""Request and response bodies of the chat endpoints (also the OpenAPI description)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


def _clean_title(value: str) -> str:
    value = value.strip()
    if not value:
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


class Chat(BaseModel):
    chat_id: str
    title: str
    model: str
    is_active: bool
    created_at: str
    updated_at: str


class Message(BaseModel):
    message_id: str
    role: Literal["user", "assistant"]
    content: str
    tokens_consumed: int
    status: Literal["complete", "stopped", "interrupted", "failed"]
    prompt_tokens: int | None
    completion_tokens: int | None
    metering_source: str | None
    finish_reason: str | None
    created_at: str


class ChatWithMessages(Chat):
    messages: list[Message]


class ChatPage(BaseModel):
    chats: list[Chat]
    next: str | None


class ErrorBody(BaseModel):
    error: Literal[True]
    code: str
    message: str
