"""The answers in OpenAI's exact shapes: `chat.completion`, `chat.completion.chunk`,
`usage` (completion tokens include thinking, as OpenAI counts reasoning), `model`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from chatmeter.providers.base import Usage

# the exchange's finish reasons in OpenAI's vocabulary; a stop (server shutting down)
# ends the reply early but well-formed
FINISH_REASONS = {"length": "length", "content_filter": "content_filter"}


def finish_reason(reason: object) -> str:
    return FINISH_REASONS.get(str(reason), "stop")


def usage_json(usage: Usage) -> dict[str, Any]:
    completion = usage.completion_tokens + usage.thinking_tokens
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": usage.prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": usage.thinking_tokens},
    }


def usage_of_event(event: dict[str, Any]) -> Usage:
    """The usage of the exchange's end event."""
    usage = event["usage"]
    return Usage(
        prompt_tokens=usage["prompt_tokens"],
        completion_tokens=usage["completion_tokens"],
        thinking_tokens=usage["thinking_tokens"],
        cached_tokens=usage["cached_tokens"],
    )


@dataclass(frozen=True, slots=True)
class Completion:
    """What every answer of one request shares."""

    id: str
    created: int
    model: str

    def _head(self, kind: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
        }

    def whole(self, content: str, finish: str, usage: Usage) -> dict[str, Any]:
        return {
            **self._head("chat.completion"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content, "refusal": None},
                    "logprobs": None,
                    "finish_reason": finish,
                }
            ],
            "usage": usage_json(usage),
        }

    def chunk(
        self, delta: dict[str, Any], finish: str | None, *, with_usage: bool
    ) -> dict[str, Any]:
        body = {
            **self._head("chat.completion.chunk"),
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if with_usage:
            body["usage"] = None  # OpenAI's chunks say null until the last one
        return body

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        return {**self._head("chat.completion.chunk"), "choices": [], "usage": usage_json(usage)}


def model_json(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "chatmeter"}
