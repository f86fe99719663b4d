"""`/v1/chat/completions` and `/v1/models` driven by the official `openai` SDK with a
chatmeter API key, against the scripted model: OpenAI's shapes, exact usage, and the
ledger and budget after each request (one exchange, `chat_id` null, nothing stored)."""

from __future__ import annotations

import asyncio
import logging
import uuid

import openai
import pytest
import sqlalchemy as sa

from chatmeter.db.tables import chats, messages
from chatmeter.metering.counting import counted_prompt
from chatmeter.providers.scripted import scripted_count
from tests.conftest import auth
from tests.support.db import books, ledger_row
from tests.support.waiting import eventually
from tests.v1.conftest import REPLY, SLOW_REPLY, V1, sdk_for


def exchange_id(completion_id: str) -> str:
    assert completion_id.startswith("chatcmpl-")
    return str(uuid.UUID(completion_id.removeprefix("chatcmpl-")))


async def assert_books_balance(v1: V1) -> None:
    state = await books(v1.server.engine, v1.user)
    assert state.total == state.ledger
    assert state.reserved == 0
    assert state.open_reservations == 0


async def nothing_stored(v1: V1) -> None:
    async with v1.server.engine.connect() as conn:
        assert (await conn.execute(sa.select(sa.func.count()).select_from(chats))).scalar() == 0
        assert (await conn.execute(sa.select(sa.func.count()).select_from(messages))).scalar() == 0


async def test_a_completion_in_openais_shape_with_exact_usage(v1: V1) -> None:
    system, question = "Answer in one line.", "What is a meter?"
    completion = await v1.sdk.chat.completions.create(
        model="scripted",
        messages=[
            {"role": "system", "content": system},
            {"role": "user", "content": "earlier"},
            {"role": "assistant", "content": "an earlier answer"},
            {"role": "user", "content": [{"type": "text", "text": question}]},
        ],
        temperature=0.2,
        top_p=0.9,
        stop=["\n\n"],
        user="ignored-field",
    )
    assert completion.object == "chat.completion"
    assert completion.model == "scripted"
    (choice,) = completion.choices
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert choice.message.content == REPLY
    assert choice.finish_reason == "stop"
    # the scripted model counts ceil(len / 4) per text: the request's system prompt
    # replaced the model's, and the client's history was sent as given
    prompt = sum(scripted_count(t) for t in (system, "earlier", "an earlier answer", question))
    usage = completion.usage
    assert usage is not None
    assert usage.prompt_tokens == prompt
    assert usage.completion_tokens == scripted_count(REPLY)
    assert usage.total_tokens == prompt + scripted_count(REPLY)
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == 0
    assert usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.reasoning_tokens == 0
    row = await ledger_row(v1.server.engine, exchange_id(completion.id))
    assert row is not None
    assert row.chat_id is None
    assert row.user_id == "olga"
    assert row.model == "scripted"
    assert (row.prompt_tokens, row.completion_tokens, row.total_tokens) == (
        usage.prompt_tokens,
        usage.completion_tokens,
        usage.total_tokens,
    )
    assert row.source == "provider"
    await assert_books_balance(v1)
    await nothing_stored(v1)
    events = (await v1.http.get("/api/usage/events", headers=auth("olga"))).json()["events"]
    assert [(e["chat_id"], e["total_tokens"]) for e in events] == [(None, usage.total_tokens)]


async def test_a_streamed_completion_ends_with_usage_and_done(v1: V1) -> None:
    stream = await v1.sdk.chat.completions.create(
        model="scripted",
        messages=[{"role": "user", "content": "Hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert {chunk.object for chunk in chunks} == {"chat.completion.chunk"}
    assert len({chunk.id for chunk in chunks}) == 1
    content = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(content) == REPLY
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert all(c.usage is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    prompt = scripted_count("You are a helpful assistant. Answer clearly and concisely.")
    prompt += scripted_count("Hi")
    assert last.usage.prompt_tokens == prompt
    assert last.usage.completion_tokens == scripted_count(REPLY)
    row = await ledger_row(v1.server.engine, exchange_id(last.id))
    assert row is not None and row.total_tokens == last.usage.total_tokens
    assert row.chat_id is None
    await assert_books_balance(v1)
    await nothing_stored(v1)


async def test_the_wire_format_of_a_stream(v1: V1) -> None:
    """What non-SDK clients parse: `data:` lines of JSON, then `data: [DONE]`."""
    body = {"model": "scripted", "messages": [{"role": "user", "content": "Hi"}], "stream": True}
    headers = {"Authorization": f"Bearer {v1.key}"}
    async with v1.http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line async for line in r.aiter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    assert '"usage"' not in "".join(lines)  # not asked for


async def test_a_stop_sequence_ends_the_reply_and_only_that_is_billed(v1: V1) -> None:
    """The scripted model honours `stop` as a model does: the reply ends before the
    earliest stop sequence it contains, and usage and the ledger count what was sent."""
    kept = REPLY[: REPLY.index(",")]
    assert kept == "Hello there"
    completion = await v1.sdk.chat.completions.create(
        model="scripted",
        messages=[{"role": "user", "content": "Hi"}],
        stop=["scripted", ",", "not in the reply"],
    )
    assert completion.choices[0].message.content == kept
    assert completion.choices[0].finish_reason == "stop"
    usage = completion.usage
    assert usage is not None
    assert usage.completion_tokens == scripted_count(kept) < scripted_count(REPLY)
    row = await ledger_row(v1.server.engine, exchange_id(completion.id))
    assert row is not None
    assert (row.completion_tokens, row.total_tokens) == (
        usage.completion_tokens,
        usage.total_tokens,
    )
    await assert_books_balance(v1)

    # streamed, with a single string: the cut falls inside the scripted model's pieces
    stream = await v1.sdk.chat.completions.create(
        model="scripted",
        messages=[{"role": "user", "content": "Hi"}],
        stop=" is a",
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello there, this"
    last = chunks[-1].usage
    assert last is not None and last.completion_tokens == scripted_count(text)
    row = await ledger_row(v1.server.engine, exchange_id(chunks[-1].id))
    assert row is not None and row.total_tokens == last.total_tokens
    await assert_books_balance(v1)


async def test_a_stop_sequence_at_the_start_is_an_empty_reply_of_no_output(v1: V1) -> None:
    completion = await v1.sdk.chat.completions.create(
        model="scripted", messages=[{"role": "user", "content": "Hi"}], stop="Hello"
    )
    assert completion.choices[0].message.content == ""
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and completion.usage.completion_tokens == 0
    await assert_books_balance(v1)


async def test_max_tokens_is_lowered_to_what_the_budget_allows(v1: V1) -> None:
    capped = await v1.sdk.chat.completions.create(
        model="scripted", messages=[{"role": "user", "content": "Hi"}], max_tokens=3
    )
    assert capped.choices[0].finish_reason == "length"
    assert capped.usage is not None and capped.usage.completion_tokens <= 3
    # a budget with room for the prompt and 4 tokens of output, no more: the scripted
    # model counts locally, so the prompt is its count, not its bound (which the budget
    # would refuse: `exchange.open_prompt_exchange` counts it then)
    used = (await books(v1.server.engine, "olga")).total
    system = "You are a helpful assistant. Answer clearly and concisely."
    limit = used + counted_prompt(scripted_count(system) + scripted_count("Hi"), 1) + 4
    admin = auth("root", admin=True)
    set_limit = await v1.http.put(
        "/api/admin/users/olga/limit", json={"token_limit": limit}, headers=admin
    )
    assert set_limit.status_code == 200
    lowered = await v1.sdk.chat.completions.create(
        model="scripted",
        messages=[{"role": "user", "content": "Hi"}],
        max_completion_tokens=400,
    )
    assert lowered.choices[0].finish_reason == "length"
    assert lowered.usage is not None and lowered.usage.completion_tokens <= 4
    await assert_books_balance(v1)


async def test_a_spent_budget_is_insufficient_quota(v1: V1) -> None:
    admin = auth("root", admin=True)
    await v1.http.put("/api/admin/users/olga/limit", json={"token_limit": 5}, headers=admin)
    with pytest.raises(openai.RateLimitError) as caught:
        await v1.sdk.chat.completions.create(
            model="scripted", messages=[{"role": "user", "content": "Hi"}]
        )
    assert caught.value.status_code == 429
    assert caught.value.code == "insufficient_quota"
    assert caught.value.type == "insufficient_quota"
    state = await books(v1.server.engine, "olga")
    assert (state.total, state.reserved, state.ledger_rows) == (0, 0, 0)


async def test_models_are_listed_and_retrieved(v1: V1) -> None:
    listed = await v1.sdk.models.list()
    names = [model.id for model in listed.data]
    assert names == sorted(["local", "scripted", "slow"])
    assert {model.object for model in listed.data} == {"model"}
    assert (await v1.sdk.models.retrieve("slow")).id == "slow"
    with pytest.raises(openai.NotFoundError) as caught:
        await v1.sdk.models.retrieve("gpt-5")
    assert caught.value.code == "model_not_found"


async def test_a_jwt_works_where_a_key_does(v1: V1) -> None:
    token = auth("olga")["Authorization"].removeprefix("Bearer ")
    async with sdk_for(v1.server, token) as sdk:
        completion = await sdk.chat.completions.create(
            model="scripted", messages=[{"role": "user", "content": "Hi"}]
        )
    assert completion.choices[0].message.content == REPLY


async def test_a_client_that_leaves_mid_stream_is_billed_what_was_generated(v1: V1) -> None:
    stream = await v1.sdk.chat.completions.create(
        model="slow", messages=[{"role": "user", "content": "long please"}], stream=True
    )
    seen = ""
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            seen += chunk.choices[0].delta.content
        if len(seen.split()) >= 3:
            break
    await stream.close()
    engine = v1.server.engine

    async def settled() -> bool:
        state = await books(engine, "olga")
        return state.ledger_rows == 1 and state.open_reservations == 0

    await eventually(settled, within=20)
    state = await books(engine, "olga")
    assert state.total == state.ledger and state.reserved == 0
    async with engine.connect() as conn:
        from chatmeter.db.tables import usage_events

        row = (await conn.execute(sa.select(usage_events))).one()
    # the scripted model reports usage only at its end: the partial reply was counted
    assert row.source == "counted"
    assert 0 < row.completion_tokens < scripted_count(SLOW_REPLY)
    assert row.chat_id is None


class Records(logging.Handler):
    def __init__(self, level: int) -> None:
        super().__init__(level)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def test_a_client_that_leaves_a_whole_completion_is_billed_and_logs_no_error(
    v1: V1,
) -> None:
    # the request's task re-raised the cancel of its exchange to uvicorn, which logged
    # "Exception in ASGI application" with a traceback at ERROR for every client that
    # gave up on a completion (an SDK's timeout)
    handler = Records(logging.ERROR)
    uvicorn_log = logging.getLogger("uvicorn.error")
    uvicorn_log.addHandler(handler)
    try:
        async with openai.AsyncOpenAI(
            base_url=v1.server.url + "/v1", api_key=v1.key, max_retries=0, timeout=0.3
        ) as impatient:
            with pytest.raises(openai.APITimeoutError):
                await impatient.chat.completions.create(
                    model="slow", messages=[{"role": "user", "content": "long please"}]
                )

        async def settled() -> bool:
            state = await books(v1.server.engine, v1.user)
            return state.ledger_rows == 1 and state.open_reservations == 0

        def requests_done() -> bool:
            running = (task.get_coro() for task in asyncio.all_tasks())
            return not any("run_asgi" in getattr(coro, "__qualname__", "") for coro in running)

        await eventually(settled, within=20)
        await eventually(requests_done, within=20)
    finally:
        uvicorn_log.removeHandler(handler)
    await assert_books_balance(v1)
    assert [r.getMessage() for r in handler.records] == []
