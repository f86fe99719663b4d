"""Every refusal under `/v1` in OpenAI's shape, as the `openai` SDK raises it: never a
500, never the chat API's `{"error": true, …}`; a refused request bills nothing."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest
import sqlalchemy as sa
from openai.types.chat import ChatCompletionMessageParam

from chatmeter.config import PlanConfig
from chatmeter.db.tables import usage_events
from tests.conftest import auth, make_settings, scripted
from tests.support.db import open_reservations
from tests.support.server import serve
from tests.v1.conftest import V1, new_key, sdk_for

HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hi"}]


async def assert_nothing_billed(v1: V1) -> None:
    engine = v1.server.engine
    async with engine.connect() as conn:
        rows = (await conn.execute(sa.select(sa.func.count()).select_from(usage_events))).scalar()
    assert rows == 0
    assert await open_reservations(engine, "olga") == 0


def assert_openai_shape(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert isinstance(error, dict), "the chat API's shape on /v1"
    assert set(error) == {"message", "type", "code", "param"}
    assert error["code"] == code
    assert isinstance(error["message"], str) and error["message"]
    return dict(error)


async def test_a_bad_key_is_invalid_api_key(v1: V1) -> None:
    for key in ("cm-" + "x" * 43, "not-a-key", v1.key + "x"):
        async with sdk_for(v1.server, key) as sdk:
            with pytest.raises(openai.AuthenticationError) as caught:
                await sdk.chat.completions.create(model="scripted", messages=HI)
        assert caught.value.status_code == 401
        assert caught.value.code == "invalid_api_key"
    no_auth = await v1.http.post("/v1/chat/completions", json={"model": "scripted"})
    assert_openai_shape(no_auth, 401, "invalid_api_key")
    models = await v1.http.get("/v1/models")
    assert_openai_shape(models, 401, "invalid_api_key")


async def test_a_revoked_key_is_refused_at_once(v1: V1) -> None:
    key_id = (await v1.http.get("/api/keys", headers=auth("olga"))).json()["keys"][0]["key_id"]
    await v1.sdk.chat.completions.create(model="scripted", messages=HI)
    assert (await v1.http.delete(f"/api/keys/{key_id}", headers=auth("olga"))).status_code == 204
    with pytest.raises(openai.AuthenticationError) as caught:
        await v1.sdk.chat.completions.create(model="scripted", messages=HI)
    assert caught.value.code == "invalid_api_key"


async def test_an_unknown_model_is_model_not_found(v1: V1) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await v1.sdk.chat.completions.create(model="gpt-4o", messages=HI)
    assert caught.value.code == "model_not_found"
    assert caught.value.param == "model"
    await assert_nothing_billed(v1)


BAD_REQUESTS: list[tuple[dict[str, Any], str | None]] = [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"n": 2}, "n"),
    ({"n": "1"}, "n"),
    (
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "what is this?"},
                        {"type": "image_url", "image_url": {"url": "https://x.example/a.png"}},
                    ],
                }
            ]
        },
        "messages[0].content[1]",
    ),
    ({"messages": []}, "messages"),
    ({"messages": "Hi"}, "messages"),
    ({"messages": [{"role": "assistant", "content": "I go last"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "   "}]}, "messages"),
    ({"messages": [{"role": "tool", "content": "42", "tool_call_id": "c1"}]}, "messages[0]"),
    ({"messages": [{"role": "wizard", "content": "Hi"}]}, "messages[0].role"),
    # a role that is not a string at all (unhashable: it used to be a 500)
    ({"messages": [{"role": ["user"], "content": "Hi"}]}, "messages[0].role"),
    ({"messages": [{"role": {"name": "user"}, "content": "Hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": ["Hi"]}, "messages[0]"),
    ({"model": 5}, "model"),
    ({"model": ""}, "model"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_completion_tokens": "10"}, "max_completion_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"temperature": 3}, "temperature"),
    ({"temperature": 2.0001}, "temperature"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": True}, "temperature"),
    ({"top_p": "high"}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_p": -1}, "top_p"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": 5}, "stop"),
    ({"stop": ["a", 1]}, "stop"),
    ({"stop": ""}, "stop"),
    ({"stop": ["a", ""]}, "stop"),
    ({"stop": {"seq": "a"}}, "stop"),
    ({"stream": "yes"}, "stream"),
    ({"stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
]


@pytest.mark.parametrize(("change", "param"), BAD_REQUESTS, ids=lambda v: str(v)[:40])
async def test_unsupported_and_malformed_requests_are_400_with_param(
    v1: V1, change: dict[str, Any], param: str | None
) -> None:
    body = {"model": "scripted", "messages": HI, **change}
    with pytest.raises(openai.BadRequestError) as caught:
        await v1.sdk.chat.completions.create(**body)
    assert caught.value.status_code == 400
    assert caught.value.code == "invalid_request_error"
    assert caught.value.type == "invalid_request_error"
    assert caught.value.param == param
    await assert_nothing_billed(v1)


async def test_bodies_that_are_not_a_request(v1: V1) -> None:
    headers = {"Authorization": f"Bearer {v1.key}", "Content-Type": "application/json"}
    for body in (b"{not json", b"[]", b"", b'{"model": "scripted", "model": "x"}'):
        response = await v1.http.post("/v1/chat/completions", content=body, headers=headers)
        assert_openai_shape(response, 400, "invalid_request_error")
    huge = b'{"model": "scripted", "messages": [{"role": "user", "content": "' + b"x" * 70_000
    response = await v1.http.post("/v1/chat/completions", content=huge + b'"}]}', headers=headers)
    assert_openai_shape(response, 413, "request_too_large")


async def test_a_prompt_past_the_context_window_is_400(v1: V1) -> None:
    """The client owns the conversation: it is sent whole or refused, never trimmed. The
    byte bound is only a first look: past it, the model's tokenizer decides."""
    fits: list[ChatCompletionMessageParam] = [{"role": "user", "content": "x " * 5000}] * 2
    fits += HI  # 20 kB, 5,000 tokens
    completion = await v1.sdk.chat.completions.create(model="scripted", messages=fits)
    assert completion.usage is not None and completion.usage.prompt_tokens > 5000
    too_long: list[ChatCompletionMessageParam] = [{"role": "user", "content": "x " * 6000}] * 3
    too_long += HI  # 9,000 tokens > 8,192
    with pytest.raises(openai.BadRequestError) as caught:
        await v1.sdk.chat.completions.create(model="scripted", messages=too_long)
    assert caught.value.param == "messages"
    assert caught.value.code == "invalid_request_error"


async def test_unknown_paths_and_methods_keep_the_shape(v1: V1) -> None:
    headers = {"Authorization": f"Bearer {v1.key}"}
    assert_openai_shape(await v1.http.get("/v1/embeddings", headers=headers), 404, "unknown_url")
    assert_openai_shape(await v1.http.get("/v1", headers=headers), 404, "unknown_url")
    wrong = await v1.http.get("/v1/chat/completions", headers=headers)
    assert_openai_shape(wrong, 405, "method_not_allowed")
    assert wrong.headers["allow"] == "POST"


async def test_a_rate_limited_request_is_rate_limit_exceeded_with_retry_after(
    database_url: str,
) -> None:
    """The plan's rate limits hold on /v1 too (one exchange core): 429
    `rate_limit_exceeded` with `Retry-After`, nothing billed for the refused request."""
    settings = make_settings(
        database_url,
        models={"scripted": scripted(reply="ok", chunks=1)},
        plans={"one": PlanConfig(requests_per_minute=1)},
        default_plan="one",
    )
    async with serve(settings) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            key = await new_key(http, "rita")
            async with sdk_for(server, key) as sdk:
                await sdk.chat.completions.create(model="scripted", messages=HI)
                with pytest.raises(openai.RateLimitError) as caught:
                    await sdk.chat.completions.create(model="scripted", messages=HI)
            assert caught.value.code == "rate_limit_exceeded"
            assert int(caught.value.response.headers["Retry-After"]) >= 1
            async with server.engine.connect() as conn:
                count = sa.select(sa.func.count()).select_from(usage_events)
                assert (await conn.execute(count)).scalar() == 1
