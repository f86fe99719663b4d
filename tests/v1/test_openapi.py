"""`/v1` in `/openapi.json`: listed with this server's models, and what it describes is
what the endpoint answers: real answers of the official SDK's requests validate against
the described schemas, and what the endpoint refuses the request schema refuses too."""

from __future__ import annotations

import json
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from pydantic.json_schema import models_json_schema

from chatmeter.openapi import COMPONENTS
from chatmeter.v1.schemas import V1_MODELS
from tests.v1.conftest import V1

Spec = dict[str, Any]


@pytest.fixture
async def spec(v1: V1) -> Spec:
    response = await v1.http.get("/openapi.json")
    assert response.status_code == 200
    document: Spec = response.json()
    return document


def validator(spec: Spec, schema: dict[str, Any]) -> Draft202012Validator:
    """`schema` with the document's components, so its `$ref`s resolve."""
    return Draft202012Validator({**schema, "components": spec["components"]})


def component(spec: Spec, name: str) -> Draft202012Validator:
    return validator(spec, {"$ref": f"#/components/schemas/{name}"})


def answer_schema(spec: Spec, path: str, method: str, status: str, media: str) -> dict[str, Any]:
    schema: dict[str, Any] = spec["paths"][path][method]["responses"][status]["content"][media][
        "schema"
    ]
    return schema


def bearer(v1: V1) -> dict[str, str]:
    return {"Authorization": f"Bearer {v1.key}"}


async def test_v1_and_keys_are_described(v1: V1, spec: Spec) -> None:
    operations = {(method.upper(), path) for path, ops in spec["paths"].items() for method in ops}
    assert {
        ("POST", "/v1/chat/completions"),
        ("GET", "/v1/models"),
        ("GET", "/v1/models/{model}"),
        ("POST", "/api/keys"),
        ("GET", "/api/keys"),
        ("DELETE", "/api/keys/{key_id}"),
    } <= operations
    completions = spec["paths"]["/v1/chat/completions"]["post"]
    assert completions["security"] == [{"bearer": []}]
    assert set(completions["responses"]["200"]["content"]) == {
        "application/json",
        "text/event-stream",
    }
    # the model is one this server has
    model = spec["paths"]["/v1/models/{model}"]["get"]["parameters"][0]["schema"]
    listed = (await v1.http.get("/v1/models", headers=bearer(v1))).json()["data"]
    assert model["enum"] == [m["id"] for m in listed]
    assert {"scripted", "slow"} <= set(model["enum"])
    for status in ("400", "401", "404", "429"):
        error = completions["responses"][status]["content"]["application/json"]["schema"]
        assert error == {"$ref": "#/components/schemas/OpenAIErrorBody"}


async def test_the_request_schema_refuses_what_the_endpoint_refuses(spec: Spec) -> None:
    schema = spec["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]
    request = validator(spec, schema["application/json"]["schema"])
    good = {
        "model": "scripted",
        "messages": [
            {"role": "assistant", "content": None},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        ],
        "temperature": 2,
        "top_p": 0,
        "stop": ["a", "b", "c", "d"],
        "max_tokens": 5,
        "n": 1,
        "user": "an unknown field, ignored",
    }
    assert request.is_valid(good)
    refused: list[dict[str, object]] = [
        {"temperature": 2.5},
        {"top_p": -0.1},
        {"stop": ["a", "b", "c", "d", "e"]},
        {"stop": ""},
        {"max_tokens": 0},
        {"model": "unknown"},
        {"messages": []},
        {"messages": [{"role": "user"}]},  # only an assistant's content may be left out
        {"messages": [{"role": "tool", "content": "42"}]},
        {"n": 2},
    ]
    for bad in refused:
        assert not request.is_valid({**good, **bad}), bad


async def test_real_answers_are_what_is_described(v1: V1, spec: Spec) -> None:
    raw = await v1.sdk.chat.completions.with_raw_response.create(
        model="scripted", messages=[{"role": "user", "content": "Hi"}], stop="scripted"
    )
    whole = validator(
        spec, answer_schema(spec, "/v1/chat/completions", "post", "200", "application/json")
    )
    whole.validate(raw.http_response.json())

    body = {
        "model": "scripted",
        "messages": [{"role": "user", "content": "Hi"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with v1.http.stream(
        "POST", "/v1/chat/completions", json=body, headers=bearer(v1)
    ) as response:
        assert response.status_code == 200
        data = [
            line.removeprefix("data: ")
            async for line in response.aiter_lines()
            if line.startswith("data: ")
        ]
    events = validator(
        spec, answer_schema(spec, "/v1/chat/completions", "post", "200", "text/event-stream")
    )
    chunk = component(spec, "ChatCompletionChunk")
    assert data[-1] == "[DONE]"
    for item in data:
        events.validate({"event": "message", "data": item})
    for item in data[:-1]:
        chunk.validate(json.loads(item))
    assert json.loads(data[-2])["usage"] is not None  # the usage chunk was checked too

    models = await v1.http.get("/v1/models", headers=bearer(v1))
    component(spec, "OpenAIModelList").validate(models.json())
    one = await v1.http.get("/v1/models/slow", headers=bearer(v1))
    component(spec, "OpenAIModel").validate(one.json())


async def test_errors_are_what_is_described(v1: V1, spec: Spec) -> None:
    error = component(spec, "OpenAIErrorBody")
    answers = [
        await v1.http.post(
            "/v1/chat/completions",
            json={"model": "scripted", "messages": [], "temperature": 3},
            headers=bearer(v1),
        ),
        await v1.http.get("/v1/models"),
        await v1.http.get("/v1/models/nope", headers=bearer(v1)),
    ]
    assert [answer.status_code for answer in answers] == [400, 401, 404]
    for answer in answers:
        error.validate(answer.json())


def test_a_broken_answer_would_be_caught() -> None:
    """The check above can fail: the described completion refuses a wrong shape."""
    _, defs = models_json_schema(V1_MODELS, ref_template=COMPONENTS)
    spec = {"components": {"schemas": defs["$defs"]}}
    good = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "scripted",
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "x", "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": 1,
            "completion_tokens": 1,
            "total_tokens": 2,
            "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0},
        },
    }
    completion = component(spec, "ChatCompletion")
    assert completion.is_valid(good)
    assert not completion.is_valid({**good, "object": "chat.completion.chunk"})
    assert not completion.is_valid({**good, "extra": 1})
