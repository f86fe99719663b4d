"""The opening fits a chat's history to the model's context window the same way on both
databases: in Python (`fit_to_context`) on SQLite and in step-by-step openings, in SQL
in PostgreSQL's one-statement opening. The prompt keeps the same messages, the
reservation holds the same tokens and money, and on PostgreSQL the common case is one
statement (issue 13)."""

from __future__ import annotations

import random
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import timedelta
from decimal import Decimal

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from chatmeter.db.engine import make_engine
from chatmeter.db.steps import Sql, Steps
from chatmeter.db.tables import chats, messages, user_usage, utcnow
from chatmeter.db.transactor import Transactor, make_transactor
from chatmeter.errors import ApiError
from chatmeter.ids import new_id
from chatmeter.metering.cost import reserve_micros
from chatmeter.metering.plans import PlanBook
from chatmeter.providers.base import ChatTurn
from chatmeter.streaming.opening import (
    ModelLimits,
    Opened,
    OpeningRules,
    PromptTooLarge,
    fit_to_context,
    open_steps,
)
from tests.conftest import make_settings
from tests.support.db import open_reservations

LIMIT = 10**12
# characters of one to four UTF-8 bytes: the bound counts bytes, not characters
ALPHABET = "ab é中😀 "
MODELS = {
    "small": ModelLimits("Be brief.", 400, 120, Decimal("1.5")),
    "wide": ModelLimits("Ünïcode system prompt 😀", 100_000, 64, Decimal("0.25")),
    # PostgreSQL's statement writes the models' names and prices into its text
    "it's": ModelLimits("", 900, 300, Decimal("1E-7")),
}


def counted(steps: Steps[Opened], seen: list[Sql]) -> Steps[Opened]:
    """`steps`, noting each statement it runs."""
    try:
        statement = next(steps)
        while True:
            seen.append(statement)
            try:
                rows = yield statement
            except Exception as exc:  # a `Conflict` the driver throws in
                statement = steps.throw(exc)
            else:
                statement = steps.send(rows)
    except StopIteration as done:
        opened: Opened = done.value
        return opened


@dataclass
class Chats:
    engine: AsyncEngine
    transactor: Transactor
    rules: OpeningRules

    async def user(self, user_id: str) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                sa.insert(user_usage).values(
                    user_id=user_id,
                    total_tokens_used=0,
                    token_limit=LIMIT,
                    reserved_tokens=0,
                    updated_at=utcnow(),
                    plan="default",
                )
            )

    async def chat(self, user_id: str, model: str, history: list[ChatTurn]) -> uuid.UUID:
        chat_id = new_id()
        start = utcnow() - timedelta(hours=1)
        async with self.engine.begin() as conn:
            await conn.execute(
                sa.insert(chats).values(
                    chat_id=chat_id,
                    user_id=user_id,
                    title="t",
                    model=model,
                    is_active=True,
                    created_at=start,
                    updated_at=start,
                )
            )
            for n, turn in enumerate(history):
                await conn.execute(
                    sa.insert(messages).values(
                        message_id=new_id(),
                        chat_id=chat_id,
                        role=turn.role,
                        content=turn.content,
                        tokens_consumed=0,
                        status="complete",
                        created_at=start + timedelta(seconds=n),
                    )
                )
        return chat_id

    async def open(self, user_id: str, chat_id: uuid.UUID, message: str) -> tuple[Opened, int]:
        seen: list[Sql] = []
        steps = open_steps(self.rules, user_id, chat_id, message, None, new_id())
        opened = await self.transactor.run(counted, steps, seen)
        return opened, len(seen)


@pytest.fixture
async def book(database_url: str) -> AsyncIterator[Chats]:
    settings = make_settings(database_url, default_token_limit=LIMIT)
    engine = make_engine(database_url)
    transactor = make_transactor(database_url, 30_000)
    await transactor.start()
    rules = OpeningRules(
        models=MODELS,
        history_messages=12,
        plans=PlanBook.of(settings),
        worker_id="test",
        reservation_ttl_seconds=600,
        writable_ctes=transactor.writable_ctes,
    )
    try:
        yield Chats(engine, transactor, rules)
    finally:
        await transactor.close()
        await engine.dispose()


def text(rng: random.Random, most: int) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, most)))


async def test_the_prompt_is_fitted_as_fit_to_context_fits_it(book: Chats) -> None:
    rng = random.Random(13)
    await book.user("fay")
    for trial in range(40):
        model = ("wide", "it's", "small", "small")[trial % 4]
        history = [
            ChatTurn("assistant" if n % 2 else "user", text(rng, 60))
            for n in range(rng.randint(0, 20))
        ]
        # assistant messages of interrupted replies may be empty: never in the prompt
        if history and trial % 5 == 0:
            history[-1] = ChatTurn("assistant", "")
        chat_id = await book.chat("fay", model, history)
        message = text(rng, 80)
        limits = MODELS[model]
        recent = [turn for turn in history if turn.content][-book.rules.history_messages :]
        try:
            kept, size, cap = fit_to_context(limits, recent, message)
        except PromptTooLarge:
            pytest.fail("the trials' messages fit the small model without history")

        opened, statements = await book.open("fay", chat_id, message)

        assert opened.request.history == kept, trial
        assert (opened.reservation.prompt_estimate, opened.request.max_output_tokens) == (
            size,
            cap,
        )
        assert opened.reservation.tokens == size + cap
        assert opened.reservation.micros == reserve_micros(size + cap, limits.highest_price)
        assert opened.request.system_prompt == limits.system_prompt
        if book.transactor.writable_ctes:  # PostgreSQL: all of it in one statement
            assert statements == 1
    assert await open_reservations(book.engine, "fay") == 40


async def test_openings_the_one_statement_does_not_make_go_on_step_by_step(
    book: Chats,
) -> None:
    """A user not seen before (no budget row), a chat of another user (403), a message
    too long for the model even alone (counted instead), a chat already replying (409):
    the same answers on both databases, and nothing is left behind."""
    chat_id = await book.chat("gil", "small", [ChatTurn("user", "hello")])
    opened, _ = await book.open("gil", chat_id, "first sight")  # makes gil's budget row
    assert opened.reservation.tokens > 0
    with pytest.raises(ApiError) as busy:
        await book.open("gil", chat_id, "again")
    assert busy.value.code == "REPLY_IN_PROGRESS"
    with pytest.raises(ApiError) as foreign:
        await book.open("hal", chat_id, "not mine")
    assert (foreign.value.status, foreign.value.code) == (403, "FORBIDDEN")
    other = await book.chat("gil", "small", [])
    with pytest.raises(PromptTooLarge):
        await book.open("gil", other, "x" * 500)
    unknown = await book.chat("gil", "gone", [])
    with pytest.raises(ApiError) as unconfigured:
        await book.open("gil", unknown, "hi")
    assert unconfigured.value.status == 400
    assert await open_reservations(book.engine, "gil") == 1


async def test_a_history_limit_of_zero_keeps_no_history(book: Chats) -> None:
    await book.user("ida")
    book.rules = replace(book.rules, history_messages=0)
    chat_id = await book.chat("ida", "wide", [ChatTurn("user", "old"), ChatTurn("assistant", "x")])
    opened, _ = await book.open("ida", chat_id, "hi")
    assert opened.request.history == ()
