"""A chat's history is trimmed only when it would overflow the context (SPEC section 5):
the opening's cheap bound (UTF-8 bytes) runs 3-4x the real count of English text, so for
a model whose tokenizer counts locally the turns it left out are counted exactly and put
back as far as the prompt's reservation holds (`prompt_counts.with_counted_history`)."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from chatmeter.db.tables import reservations
from chatmeter.metering.counting import EXCHANGE_OVERHEAD_TOKENS, counted_prompt, text_bound
from chatmeter.providers.base import ChatTurn
from chatmeter.providers.scripted import scripted_count
from chatmeter.streaming import prompt_counts
from chatmeter.streaming.opening import ModelLimits, fit_to_context
from tests.conftest import auth, make_settings, scripted, token_for
from tests.streaming.test_exchange import new_chat
from tests.support.admin import set_token_limit
from tests.support.db import balanced, chat_rows, period_books
from tests.support.db import books as books_of
from tests.support.server import serve
from tests.support.sse import StreamResult, parse_events, stream_message

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


async def test_a_tokenizer_that_hangs_holds_up_a_reply_whose_cap_was_lowered_no_longer(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HISTORY_COUNT_SECONDS is the most the counts after an opening hold the reply up,
    all of them: the history's count and then the lowered cap's (`with_counted_cap`)
    each waited for it in turn, twice as long, for a tokenizer that never answers. Once
    the opening's deadline has passed, the cap's count is not asked at all."""
    waited = 1.0
    monkeypatch.setattr(prompt_counts, "HISTORY_COUNT_SECONDS", waited)
    settings = make_settings(database_url, models={"short": SHORT}, history_messages=10)
    async with serve(settings) as running:
        async with httpx.AsyncClient(base_url=running.url, timeout=30) as http:
            chat = await chat_of_five_exchanges(http, "slow")
            used = (await http.get("/api/usage", headers=auth("slow"))).json()
            # room for the bound's prompt (which leaves history out) and a few tokens:
            # the budget lowers the output cap
            await set_token_limit(http, "slow", used["total_tokens_used"] + 352)
            provider = await running.services.providers.get("short")
            never = asyncio.Event()
            asked: list[list[str]] = []

            async def hangs(texts: list[str]) -> list[int]:
                asked.append(texts)
                await never.wait()
                return []

            monkeypatch.setattr(provider, "count_tokens", hangs)
            result = await stream_message(http, chat, QUESTIONS[-1], token_for("slow"))
            assert result.status == 200 and result.last["done"] is True, result
            assert result.last["finish_reason"] == "length"  # the cap was lowered
            # the history's count waited out the deadline; the cap's was never asked
            assert len(asked) == 1, asked


# a question the bound reads as 1,208 tokens, of 300 by count: alone it passes the bound
# of a 600-token context (the opening counts it), and in the history it is left out by
# the bound where its count fits the context with hundreds of tokens to spare
LONG_QUESTION = ("Tell me all about the colours of the sea at dawn, please. " * 21)[:1200]
WIDE = scripted(
    reply=REPLY,
    chunks=4,
    delay_ms=100,
    context_window=600,
    max_output_tokens=50,
    system_prompt=SYSTEM,
)


async def open_reservation_rows(engine: AsyncEngine, user: str) -> list[int]:
    """The tokens each of the user's reservations holds."""
    async with engine.connect() as conn:
        query = sa.select(reservations.c.tokens).where(reservations.c.user_id == user)
        return [int(tokens) for tokens in (await conn.execute(query)).scalars()]


def counted_texts(texts: list[str]) -> int:
    """The counted size of a prompt of these texts, system prompt first (`counted_prompt`)."""
    return counted_prompt(sum(map(scripted_count, texts)), len(texts) - 1)


async def test_history_whose_count_fits_the_context_widens_the_reservation_if_the_budget_holds(
    database_url: str,
) -> None:
    """The put-back history was held to the prompt's reservation, which the bound sized
    from what it kept: a 300-token turn was left out with 480 of the context's tokens
    free. Now the reservation is widened for it when the budget holds the difference
    (`budget.widen_reservation`), and the prompt sent stays within what is reserved;
    when the budget does not hold it, the prompt stays within the opening's reservation."""
    texts = [SYSTEM, LONG_QUESTION, REPLY, "And?"]
    settings = make_settings(database_url, models={"wide": WIDE})
    async with serve(settings) as running:
        async with httpx.AsyncClient(base_url=running.url, timeout=30) as http:
            for user, widens in (("tight", False), ("roomy", True)):
                chat = await new_chat(http, user, model="wide")
                first = await stream_message(http, chat, LONG_QUESTION, token_for(user))
                assert first.last["done"] is True, first.last
                if not widens:
                    # room for the opening's reservation (the bound of what it keeps and
                    # the output cap), not for the widening
                    used = first.last["tokens_used"]
                    kept = [SYSTEM, REPLY, "And?"]
                    opening = sum(map(text_bound, kept)) + EXCHANGE_OVERHEAD_TOKENS + 50
                    assert opening < counted_texts(texts) + 50
                    await set_token_limit(http, user, used + opening)
                result = StreamResult(0, httpx.Headers())
                held = 0
                async with http.stream(
                    "POST",
                    f"/api/chat/{chat}/message",
                    json={"message": "And?"},
                    headers=auth(user),
                ) as response:
                    assert response.status_code == 200
                    async for _ in parse_events(response.aiter_lines(), result):
                        if len(result.events) == 1:  # the reply is named: its opening is done
                            rows = await open_reservation_rows(running.engine, user)
                            (held,) = rows
                prompt = result.last["usage"]["prompt_tokens"]
                if widens:
                    assert prompt == sum(map(scripted_count, texts))
                    # the prompt counted, within the reservation beside the output cap
                    assert held - 50 >= counted_texts(texts), held
                else:
                    assert prompt == sum(map(scripted_count, [SYSTEM, REPLY, "And?"]))
                books = await period_books(running.engine, user)
                assert balanced(books) and (books.reserved, books.active) == (0, 0)
                state = await books_of(running.engine, user)
                assert state.total == state.ledger <= state.limit
