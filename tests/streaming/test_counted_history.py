"""A chat's history is trimmed only when it would overflow the context (SPEC section 5):
the opening's cheap bound (UTF-8 bytes) runs 3-4x the real count of English text, so for
a model whose tokenizer counts locally the turns it left out are counted exactly and put
back as far as the prompt's reservation holds (`exchange.with_counted_history`)."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from chatmeter.providers.base import ChatTurn
from chatmeter.providers.scripted import scripted_count
from chatmeter.streaming.opening import ModelLimits, fit_to_context
from tests.conftest import make_settings, scripted, token_for
from tests.streaming.test_exchange import new_chat
from tests.support.db import balanced, chat_rows, period_books
from tests.support.server import serve
from tests.support.sse import stream_message

SYSTEM = "Be brief."
# 120 ASCII characters: a bound of 124, a count of 30
REPLY = "The answer, in plain English that a byte bound reads as four times its tokens.".ljust(120)
# context 400, output cap 50: by the bound, four of ten earlier turns fit; counted, all ten
SHORT = scripted(
    reply=REPLY, chunks=2, context_window=400, max_output_tokens=50, system_prompt=SYSTEM
)


# the chat's five earlier messages, then the one that is answered with that history
QUESTIONS = [f"Question {n}?" for n in range(6)]


async def chat_of_five_exchanges(http: httpx.AsyncClient, user: str) -> str:
    """A chat on SHORT whose first five questions are answered: ten earlier turns."""
    chat = await new_chat(http, user, model="short")
    for question in QUESTIONS[:-1]:
        done = await stream_message(http, chat, question, token_for(user))
        assert done.last["done"] is True, done.last
    return chat


async def test_history_the_bound_left_out_is_sent_when_its_count_fits(database_url: str) -> None:
    assert len(REPLY) == 120
    settings = make_settings(database_url, models={"short": SHORT}, history_messages=10)
    async with serve(settings) as running:
        async with httpx.AsyncClient(base_url=running.url, timeout=30) as http:
            chat = await chat_of_five_exchanges(http, "long")
            result = await stream_message(http, chat, QUESTIONS[-1], token_for("long"))
            sent = [SYSTEM, *(t for q in QUESTIONS[:-1] for t in (q, REPLY)), QUESTIONS[-1]]
            assert result.last["usage"]["prompt_tokens"] == sum(map(scripted_count, sent))
            books = await period_books(running.engine, "long")
            assert balanced(books) and (books.reserved, books.active) == (0, 0)


# 240 ASCII characters, a count of 60: ten earlier exchanges hold more than the context
LONG_REPLY = (REPLY * 2)[:240]
LONG = scripted(
    reply=LONG_REPLY, chunks=2, context_window=400, max_output_tokens=50, system_prompt=SYSTEM
)


async def test_history_put_back_stays_within_the_context_whatever_the_cache_holds(
    database_url: str,
) -> None:
    """Counts the bounded cache cannot hold all at once (`count_cache_size`, here 2) are
    still each text's own: counts read back as 0 put back turns past the prompt's
    reservation (SPEC section 6: the reservation holds the prompt billed; 336 tokens
    sent of 317 reserved, before)."""
    settings = make_settings(
        database_url, models={"long": LONG}, history_messages=20, count_cache_size=2
    )
    async with serve(settings) as running:
        async with httpx.AsyncClient(base_url=running.url, timeout=30) as http:
            chat = await new_chat(http, "lena", model="long")
            for n in range(10):
                done = await stream_message(http, chat, f"Question {n}?", token_for("lena"))
                assert done.last["done"] is True
            said = [
                ChatTurn(row.role, row.content) for row in await chat_rows(running.engine, chat)
            ]
            limits = running.services.opening_rules.models["long"]
            kept, reserved, _ = fit_to_context(limits, said, "Question 10?")
            result = await stream_message(http, chat, "Question 10?", token_for("lena"))
            assert result.last["done"] is True
            prompt = result.last["usage"]["prompt_tokens"]
            # more than the bound kept, and no more than the opening reserved for it
            kept_count = sum(scripted_count(t.content) for t in kept)
            assert scripted_count(SYSTEM) + kept_count + scripted_count("Question 10?") < prompt
            assert prompt <= reserved, (prompt, reserved)
            books = await period_books(running.engine, "lena")
            assert balanced(books) and (books.reserved, books.active) == (0, 0)


async def test_a_tokenizer_that_hangs_holds_the_reply_up_briefly_then_sends_what_the_bound_kept(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The count that puts history back waits HISTORY_COUNT_SECONDS at most: a tokenizer
    that never answers (the provider's own timeout may be a minute) costs the reply that,
    and the prompt is what the opening's bound kept."""
    settings = make_settings(database_url, models={"short": SHORT}, history_messages=10)
    async with serve(settings) as running:
        async with httpx.AsyncClient(base_url=running.url, timeout=30) as http:
            chat = await chat_of_five_exchanges(http, "hung")
            provider = await running.services.providers.get("short")
            never = asyncio.Event()

            async def hangs(texts: list[str]) -> list[int]:
                await never.wait()
                return []

            monkeypatch.setattr(provider, "count_tokens", hangs)
            result = await stream_message(http, chat, QUESTIONS[-1], token_for("hung"))
            assert result.last["done"] is True, result.last
            rows = await chat_rows(running.engine, chat)
            turns = [ChatTurn(row.role, row.content) for row in rows[:-2]]  # before the last
            kept, _, _ = fit_to_context(ModelLimits(SYSTEM, 400, 50), turns, QUESTIONS[-1])
            sent = [SYSTEM, *(turn.content for turn in kept), QUESTIONS[-1]]
            assert len(kept) < len(turns)
            assert result.last["usage"]["prompt_tokens"] == sum(map(scripted_count, sent))
