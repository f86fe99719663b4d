"""A Chat Completions request read into an exchange's `Prompt` (SPEC section 12).

Supported: `model`, `messages` (roles system/developer, user, assistant; text content as
a string or text parts), `stream`, `stream_options.include_usage`, `max_tokens` /
`max_completion_tokens`, and `temperature`, `top_p`, `stop`, which are passed on to the
provider; unknown fields are ignored.
Refused with 400 and the offending `param`: tools and function calling, images and
other non-text parts, `n > 1`, and malformed values."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from chatmeter.providers.base import ChatTurn, Sampling
from chatmeter.streaming.opening import Prompt
from chatmeter.v1.errors import bad_request

SYSTEM_ROLES = frozenset({"system", "developer"})
TURN_ROLES = frozenset({"user", "assistant"})
# present and not null/empty, these ask for something chatmeter does not do (yet)
TOOL_FIELDS = ("tools", "tool_choice", "functions", "function_call", "parallel_tool_calls")
MAX_STOP = 4


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    prompt: Prompt
    stream: bool
    include_usage: bool


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _text(content: object, where: str, *, allow_null: bool) -> str:
    """A message's content: a string, or a list of text parts joined."""
    if content is None and allow_null:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for index, part in enumerate(content):
            at = f"{where}[{index}]"
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise bad_request("each content part must be an object with a type", at)
            if part["type"] != "text":
                raise bad_request(
                    f"content parts of type {part['type']!r} are not supported: text only", at
                )
            if not isinstance(part.get("text"), str):
                raise bad_request("a text part needs a string `text`", at)
            texts.append(part["text"])
        return "".join(texts)
    raise bad_request("content must be a string or a list of text parts", where)


def _conversation(messages: object) -> tuple[str | None, list[ChatTurn]]:
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty array", "messages")
    system: list[str] = []
    turns: list[ChatTurn] = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise bad_request("each message must be an object", where)
        role = message.get("role")
        if not isinstance(role, str):
            # not even a name: a list or an object as the role could not be looked up
            raise bad_request("role must be system, user or assistant", f"{where}.role")
        if (
            message.get("tool_calls")
            or message.get("function_call")
            or role in ("tool", "function")
        ):
            raise bad_request("tool and function calls are not supported", where)
        content = _text(message.get("content"), f"{where}.content", allow_null=role == "assistant")
        if role in SYSTEM_ROLES:
            system.append(content)
        elif role == "user":
            turns.append(ChatTurn("user", content))
        elif role == "assistant":
            turns.append(ChatTurn("assistant", content))
        else:
            raise bad_request(f"unknown role {role!r}: system, user or assistant", f"{where}.role")
    if not turns or turns[-1].role != "user":
        raise bad_request("the last message (after system ones) must be a user message", "messages")
    if not turns[-1].content.strip():
        raise bad_request("the last user message must not be blank", "messages")
    # system messages, wherever they stand, replace the model's system prompt
    return ("\n\n".join(system) if system else None), turns


def _output_cap(body: dict[str, Any]) -> int | None:
    caps = []
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if not _is_int(value) or value < 1:
            raise bad_request(f"{name} must be a positive integer", name)
        caps.append(value)
    return min(caps) if caps else None


def _in_range(body: dict[str, Any], name: str, high: int) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    # NaN fails the comparison and infinity the bound: both are refused
    if not _is_number(value) or not 0 <= value <= high:
        raise bad_request(f"{name} must be a number from 0 to {high}", name)
    return float(value)


def _stop(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    stop = [value] if isinstance(value, str) else value
    if (
        not isinstance(stop, list)
        or len(stop) > MAX_STOP
        or not all(isinstance(s, str) and s for s in stop)
    ):
        raise bad_request(
            f"stop must be a non-empty string or a list of up to {MAX_STOP} of them", "stop"
        )
    return tuple(stop)


def _sampling(body: dict[str, Any]) -> Sampling:
    """OpenAI's ranges: temperature 0..2, top_p 0..1, up to four stop sequences."""
    return Sampling(
        temperature=_in_range(body, "temperature", 2),
        top_p=_in_range(body, "top_p", 1),
        stop=_stop(body.get("stop")),
    )


def _check_unsupported(body: dict[str, Any]) -> None:
    for name in TOOL_FIELDS:
        if body.get(name) not in (None, [], {}):
            raise bad_request(f"{name}: tools and function calling are not supported yet", name)
    n = body.get("n")
    if n is not None and (not _is_int(n) or n != 1):
        raise bad_request("n: only one choice (n = 1) is supported", "n")


def parse_completion_request(body: object) -> CompletionRequest:
    """The request, checked; raises OpenAIError (400) naming the bad `param`. The model
    is checked against the registry by the caller (404)."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("model must be a non-empty string", "model")
    _check_unsupported(body)
    system, turns = _conversation(body.get("messages"))
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad_request("stream must be a boolean", "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request("stream_options must be an object", "stream_options")
    include_usage = (options or {}).get("include_usage")
    if include_usage is not None and not isinstance(include_usage, bool):
        raise bad_request("include_usage must be a boolean", "stream_options.include_usage")
    sampling = _sampling(body)
    prompt = Prompt(
        model=model,
        system_prompt=system,
        history=tuple(turns[:-1]),
        message=turns[-1].content,
        max_output_tokens=_output_cap(body),
        sampling=sampling,
    )
    return CompletionRequest(prompt, bool(stream), bool(include_usage))
