"""Near the end of a budget, the opening's cheap bound of the prompt (UTF-8 bytes, 3-4x
the real count of English text) refused requests that fit: for a model whose tokenizer
counts locally, a budget refusal the bound may have caused is asked again with the
prompt counted exactly (`exchange.open_exchange`, `open_prompt_exchange`). The refusal
stands when the count does not fit either, and for a provider whose count is an API
call (no count calls, SPEC section 9)."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import httpx
import pytest

from chatmeter.config import PlanConfig
from chatmeter.metering.counting import EXCHANGE_OVERHEAD_TOKENS, counted_prompt, text_bound
from chatmeter.providers.scripted import scripted_count
from tests.conftest import auth, make_settings, scripted, token_for
from tests.streaming.test_exchange import new_chat
from tests.support.admin import set_token_limit
from tests.support.db import balanced, books, chat_rows, period_books
from tests.support.server import RunningServer, serve
from tests.support.sse import stream_message

SYSTEM = "Be brief."
REPLY = "A short scripted answer, some forty characters long."
SHORT = scripted(reply=REPLY, chunks=2, max_output_tokens=50, system_prompt=SYSTEM)
QUESTION = "Could you tell me, in a few plain words, what the weather is like today?"


def bound(texts: list[str]) -> int:
    """The opening's bound of a prompt of these texts (system prompt first)."""
    return sum(map(text_bound, texts)) + EXCHANGE_OVERHEAD_TOKENS


def counted(texts: list[str]) -> int:
    """The exactly counted size of a prompt of these texts (system prompt first)."""
    return counted_prompt(sum(map(scripted_count, texts)), len(texts) - 1)


async def leave(server: RunningServer, http: httpx.AsyncClient, user: str, room: int) -> None:
    """Set the user's limit so that `room` tokens of it are left."""
    usage = await http.get("/api/usage", headers=auth(user))
    assert usage.status_code == 200, usage.text
    await set_token_limit(http, user, usage.json()["total_tokens_used"] + room)


def completion(message: str, max_tokens: int | None = None) -> dict[str, object]:
    body: dict[str, object] = {
        "model": "short",
        "messages": [{"role": "user", "content": message}],
    }
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return body


async def test_a_v1_prompt_its_bound_refused_is_served_when_its_count_fits(
    database_url: str,
) -> None:
    texts = [SYSTEM, QUESTION]
    exact, by_bound = counted(texts), bound(texts)
    assert exact + 10 < by_bound  # room for the count and ten tokens of output, not the bound
    settings = make_settings(database_url, models={"short": SHORT})
    async with serve(settings) as running:
        async with httpx.AsyncClient(base_url=running.url, timeout=30) as http:
            # too little room for even the count: refused as before, nothing spent
            await leave(running, http, "near", exact)
            refused = await http.post(
                "/v1/chat/completions", json=completion(QUESTION), headers=auth("near")
            )
            assert refused.status_code == 429, refused.text
            assert refused.json()["error"]["code"] == "insufficient_quota"
            state = await books(running.engine, "near")
            assert (state.total, state.reserved, state.ledger_rows) == (0, 0, 0)
            # room for the count and ten tokens of output: served, within the limit
            await leave(running, http, "near", exact + 10)
            answer = await http.post(
                "/v1/chat/completions", json=completion(QUESTION), headers=auth("near")
            )
            assert answer.status_code == 200, answer.text
            usage = answer.json()["usage"]
            assert usage["prompt_tokens"] == sum(map(scripted_count, texts))
            assert 0 < usage["completion_tokens"] <= 10  # the cap the budget allowed
            state = await books(running.engine, "near")
            assert state.total == state.ledger == usage["total_tokens"] <= state.limit
            assert state.reserved == 0 and state.open_reservations == 0


async def test_a_chat_message_its_bound_refused_is_served_with_its_history(
    database_url: str,
) -> None:
    settings = make_settings(database_url, models={"short": SHORT})
    async with serve(settings) as running:
        async with httpx.AsyncClient(base_url=running.url, timeout=30) as http:
            chat = await new_chat(http, "ines", model="short")
            for n in range(2):
                done = await stream_message(http, chat, f"Question {n}?", token_for("ines"))
                assert done.last["done"] is True, done.last
            said = [row.content for row in await chat_rows(running.engine, chat)]
            texts = [SYSTEM, *said, QUESTION]
            exact, by_bound = counted(texts), bound(texts)
            assert exact + 10 < by_bound
            await leave(running, http, "ines", exact)
            refused = await stream_message(http, chat, QUESTION, token_for("ines"))
            assert refused.status == 403, refused
            assert len(await chat_rows(running.engine, chat)) == len(said)  # nothing saved
            await leave(running, http, "ines", exact + 10)
            result = await stream_message(http, chat, QUESTION, token_for("ines"))
            assert result.status == 200, result.status
            assert result.last["done"] is True, result.last
            # the whole history was sent: the count fitted the budget, not only the bound
            usage = result.last["usage"]
            assert usage["prompt_tokens"] == sum(map(scripted_count, texts))
            assert 0 < usage["completion_tokens"] <= 10
            state = await period_books(running.engine, "ines")
            assert balanced(state) and (state.reserved, state.active) == (0, 0)
            state_now = await books(running.engine, "ines")
            assert state_now.total == state_now.ledger <= state_now.limit


async def test_a_provider_that_does_not_count_locally_keeps_its_refusal_and_no_count_calls(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    texts = [SYSTEM, QUESTION]
    settings = make_settings(database_url, models={"short": SHORT})
    async with serve(settings) as running:
        async with httpx.AsyncClient(base_url=running.url, timeout=30) as http:
            provider = await running.services.providers.get("short")
            await leave(running, http, "gil", counted(texts) + 10)
            asked: list[list[str]] = []
            count_tokens = provider.count_tokens

            async def counting(texts: list[str]) -> list[int]:
                asked.append(texts)
                return await count_tokens(texts)

            monkeypatch.setattr(provider, "count_tokens", counting)
            # as Gemini's and OpenAI's: a count is an API call
            monkeypatch.setattr(provider, "counts_locally", False)
            refused = await http.post(
                "/v1/chat/completions", json=completion(QUESTION), headers=auth("gil")
            )
            assert refused.status_code == 429, refused.text
            assert asked == []
            monkeypatch.setattr(provider, "counts_locally", True)
            answer = await http.post(
                "/v1/chat/completions", json=completion(QUESTION), headers=auth("gil")
            )
            assert answer.status_code == 200, answer.text


async def test_concurrent_counted_openings_never_pass_the_limit(database_url: str) -> None:
    """Room for one counted prompt and its output, asked for by five requests at once:
    one is served, the others refused, and the budget is never overspent (each counted
    opening is the same one atomic statement as any other)."""
    texts = [SYSTEM, QUESTION]
    exact = counted(texts)
    settings = make_settings(database_url, models={"short": SHORT})
    async with serve(settings) as running:
        async with httpx.AsyncClient(base_url=running.url, timeout=30) as http:
            await leave(running, http, "pia", exact + 10)
            body = completion(QUESTION, max_tokens=10)
            answers = await asyncio.gather(
                *(
                    http.post("/v1/chat/completions", json=body, headers=auth("pia"))
                    for _ in range(5)
                )
            )
            codes = sorted(answer.status_code for answer in answers)
            assert codes == [200, 429, 429, 429, 429], [a.text for a in answers]
            state = await books(running.engine, "pia")
            assert state.total == state.ledger <= state.limit and state.reserved == 0


async def test_a_prompt_its_bound_priced_past_the_spend_limit_is_served_when_its_count_fits(
    database_url: str,
) -> None:
    """The money reserved is the tokens reserved at the model's highest price: the bound
    refused a spend limit with room for the counted prompt and ten tokens of output."""
    texts = [SYSTEM, QUESTION]
    exact = counted(texts)
    priced = SHORT.model_copy(update={"price_input": Decimal(1), "price_output": Decimal(10)})
    # ten micro-units a token at the highest price: room for exactly exact + 10 tokens
    plans = {"tight": PlanConfig(spend_limit=Decimal((exact + 10) * 10) / 10**6)}
    settings = make_settings(database_url, models={"short": priced}, plans=plans)
    async with serve(settings) as running:
        async with httpx.AsyncClient(base_url=running.url, timeout=30) as http:
            assigned = await http.put(
                "/api/admin/users/sam/plan",
                json={"plan": "tight"},
                headers=auth("root", admin=True),
            )
            assert assigned.status_code == 200, assigned.text
            answer = await http.post(
                "/v1/chat/completions", json=completion(QUESTION), headers=auth("sam")
            )
            assert answer.status_code == 200, answer.text
            assert 0 < answer.json()["usage"]["completion_tokens"] <= 10
            state = await period_books(running.engine, "sam")
            assert balanced(state) and state.spend <= (exact + 10) * 10
            assert (state.reserved, state.reserved_micros, state.active) == (0, 0, 0)


async def test_an_output_cap_the_bound_lowered_is_raised_to_what_the_counted_prompt_leaves(
    database_url: str,
) -> None:
    """A budget with room for the prompt's bound and 5 tokens more: the bound gave the
    reply 5 tokens (cut short, `length`) where the counted prompt leaves room for all
    of it. The reservation is the same (the budget holds as before): only its split
    between prompt and output follows the count."""
    texts = [SYSTEM, QUESTION]
    assert bound(texts) + 5 - counted(texts) > scripted_count(REPLY) > 5
    settings = make_settings(database_url, models={"short": SHORT})
    async with serve(settings) as running:
        async with httpx.AsyncClient(base_url=running.url, timeout=30) as http:
            await leave(running, http, "ola", bound(texts) + 5)
            answer = await http.post(
                "/v1/chat/completions", json=completion(QUESTION), headers=auth("ola")
            )
            assert answer.status_code == 200, answer.text
            assert answer.json()["choices"][0]["finish_reason"] == "stop"
            assert answer.json()["usage"]["completion_tokens"] == scripted_count(REPLY)
            chat = await new_chat(http, "ola", model="short")
            await leave(running, http, "ola", bound(texts) + 5)
            result = await stream_message(http, chat, QUESTION, token_for("ola"))
            assert result.status == 200, result.status
            assert result.last["finish_reason"] == "stop", result.last
            state = await period_books(running.engine, "ola")
            assert balanced(state) and (state.reserved, state.active) == (0, 0)
            totals = await books(running.engine, "ola")
            assert totals.total == totals.ledger <= totals.limit


async def test_a_counted_opening_sends_the_history_the_bound_kept_when_more_does_not_fit(
    database_url: str,
) -> None:
    """The context trims the history by the bound; counted, more of it fits the context.
    A budget with room for the counted prompt of the history the bound kept (and ten
    tokens of output), not for all the history the count fits: the counted opening was
    asked only with all of it, and the refusal stood, though the request with the
    history the bound itself kept was the bound's refusal to undo."""
    model = SHORT.model_copy(update={"context_window": 700})
    settings = make_settings(database_url, models={"short": model})
    async with serve(settings) as running:
        async with httpx.AsyncClient(base_url=running.url, timeout=30) as http:
            chat = await new_chat(http, "una", model="short")
            for n in range(2):
                long_question = f"Question {n}: " + "and then some more words " * 16
                done = await stream_message(http, chat, long_question, token_for("una"))
                assert done.last["done"] is True, done.last
            said = [row.content for row in await chat_rows(running.engine, chat)]
            # the bound keeps the three newest turns in the context, the count all four
            kept = said[1:]
            assert bound([SYSTEM, *said, QUESTION]) + 50 > 700
            assert bound([SYSTEM, *kept, QUESTION]) + 50 <= 700
            room = counted([SYSTEM, *kept, QUESTION]) + 10
            assert counted([SYSTEM, *said, QUESTION]) + 1 > room
            assert bound([SYSTEM, *kept, QUESTION]) + 1 > room
            await leave(running, http, "una", room)
            result = await stream_message(http, chat, QUESTION, token_for("una"))
            assert result.status == 200, result
            assert result.last["done"] is True, result.last
            usage = result.last["usage"]
            assert usage["prompt_tokens"] == sum(map(scripted_count, [SYSTEM, *kept, QUESTION]))
            assert 0 < usage["completion_tokens"] <= 10
            state = await period_books(running.engine, "una")
            assert balanced(state) and (state.reserved, state.active) == (0, 0)
            totals = await books(running.engine, "una")
            assert totals.total == totals.ledger <= totals.limit
