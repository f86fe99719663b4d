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
from chatmeter.db.tables import chats, messages, reservations, user_usage, utcnow
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
    chat_and_history,
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

    async def user(self, user_id: str, plan: str = "default") -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                sa.insert(user_usage).values(
                    user_id=user_id,
                    total_tokens_used=0,
                    token_limit=LIMIT,
                    reserved_tokens=0,
                    updated_at=utcnow(),
                    plan=plan,
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

    async def open(
        self, user_id: str, chat_id: uuid.UUID, message: str
    ) -> tuple[Opened, int | None]:
        """The opening, and on PostgreSQL how many statements it ran. On SQLite the
        transaction may go to the writer process, its arguments pickled: no generator
        (and no list of the statements seen there) can go with it."""
        args = (self.rules, user_id, chat_id, message, None, new_id())
        if not self.transactor.writable_ctes:
            return await self.transactor.run(open_steps, *args), None
        seen: list[Sql] = []
        opened = await self.transactor.run(counted, open_steps(*args), seen)
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
        assert opened.dropped == tuple(recent[: len(recent) - len(kept)]), trial
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


async def test_any_configured_model_name_is_written_into_the_statement_safely(
    book: Chats,
) -> None:
    """Model names are configuration, any text: PostgreSQL's statement writes them all
    into its text, so one name with a backslash before a quote, or a NUL character, must
    neither break the statement (every chat's opening, whatever its model) nor change
    which model a chat's row matches."""
    odd = {
        "back\\'slash\\": ModelLimits("", 900, 300, Decimal("2")),
        "nul\x00name": ModelLimits("", 900, 300, Decimal("2")),
    }
    book.rules = replace(book.rules, models={**MODELS, **odd})
    await book.user("jo")
    chat_id = await book.chat("jo", "small", [ChatTurn("user", "hello")])
    opened, statements = await book.open("jo", chat_id, "hi")
    assert opened.model == "small"
    assert opened.request.history == (ChatTurn("user", "hello"),)
    if book.transactor.writable_ctes:
        assert statements == 1
    odd_chat = await book.chat("jo", "back\\'slash\\", [])
    opened, _ = await book.open("jo", odd_chat, "hi")
    assert opened.model == "back\\'slash\\"
    assert opened.reservation.micros == reserve_micros(opened.reservation.tokens, Decimal(2))


async def test_messages_of_the_same_time_are_fitted_in_the_order_the_history_is_read(
    book: Chats,
) -> None:
    """Messages written at the same instant (a reply and the message it answered, or
    several of one role): the prompt keeps the newest as the history's read orders them
    (time, role, id), in SQL as in `fit_to_context`, however the cut falls among them."""
    rng = random.Random(7)
    await book.user("kim")
    start = utcnow() - timedelta(hours=1)
    for trial in range(12):
        chat_id = await book.chat("kim", "small", [])
        async with book.engine.begin() as conn:
            for _ in range(14):
                await conn.execute(
                    sa.insert(messages).values(
                        message_id=new_id(),
                        chat_id=chat_id,
                        role=rng.choice(("user", "assistant")),
                        content=text(rng, 60),
                        tokens_consumed=0,
                        status="complete",
                        created_at=start + timedelta(seconds=rng.randint(0, 2)),
                    )
                )
        chat, history = await book.transactor.run(
            chat_and_history, chat_id, book.rules.history_messages
        )
        assert chat is not None
        message = text(rng, 40)
        kept, size, cap = fit_to_context(MODELS["small"], history, message)

        opened, _ = await book.open("kim", chat_id, message)

        assert opened.request.history == kept, trial
        assert opened.dropped == tuple(history[: len(history) - len(kept)]), trial
        assert (opened.reservation.prompt_estimate, opened.reservation.output_cap) == (size, cap)
        # integers, not a Decimal that compares equal (PostgreSQL's numeric)
        figures = (opened.reservation.tokens, opened.reservation.prompt_estimate)
        assert {type(n) for n in (*figures, opened.reservation.micros)} == {int}
        assert type(opened.request.max_output_tokens) is int


async def test_a_budget_short_of_the_fitted_prompt_lowers_the_cap_or_refuses(
    book: Chats,
) -> None:
    """The one statement reserves all of the fitted prompt and cap or nothing: a budget
    with room for the prompt and part of the cap gets the part (step by step), one with
    no room for any output is refused (403) with nothing written."""
    history = [ChatTurn("user", "hello there"), ChatTurn("assistant", "hi! 😀")]
    _, size, cap = fit_to_context(MODELS["small"], history, "next")
    assert cap > 5
    for user, limit in (("lee", size + 5), ("max", size)):
        chat_id = await book.chat(user, "small", history)
        async with book.engine.begin() as conn:
            await conn.execute(
                sa.insert(user_usage).values(
                    user_id=user,
                    total_tokens_used=0,
                    token_limit=limit,
                    token_limit_overridden=True,
                    reserved_tokens=0,
                    updated_at=utcnow(),
                    plan="default",
                )
            )
        if limit > size:
            opened, _ = await book.open(user, chat_id, "next")
            assert (opened.reservation.tokens, opened.request.max_output_tokens) == (limit, 5)
            assert opened.reservation.micros == reserve_micros(limit, Decimal("1.5"))
            assert await open_reservations(book.engine, user) == 1
        else:
            with pytest.raises(ApiError) as refused:
                await book.open(user, chat_id, "next")
            assert (refused.value.status, refused.value.code) == (403, "TOKEN_BUDGET_EXCEEDED")
            assert await open_reservations(book.engine, user) == 0
            async with book.engine.connect() as conn:
                count = sa.select(sa.func.count()).where(messages.c.chat_id == chat_id)
                assert (await conn.execute(count)).scalar_one() == len(history)


async def test_a_chat_held_by_a_dead_process_is_released_or_refused(book: Chats) -> None:
    """The chat's reservation outlived its lease (its process died): the one statement
    breaks the chat's unique reservation, and the opening goes on step by step, which
    releases it (no Redis) or answers 409 (with Redis: the sweeper settles it first),
    writing nothing then."""
    await book.user("ned")
    chat_id = await book.chat("ned", "small", [ChatTurn("user", "hello")])
    await book.open("ned", chat_id, "first")
    past = utcnow() - timedelta(hours=1)
    async with book.engine.begin() as conn:
        await conn.execute(
            sa.update(reservations).where(reservations.c.chat_id == chat_id).values(expires_at=past)
        )
    book.rules = replace(book.rules, settles_orphans=True)
    with pytest.raises(ApiError) as busy:
        await book.open("ned", chat_id, "second")
    assert busy.value.code == "REPLY_IN_PROGRESS"
    async with book.engine.connect() as conn:
        count = sa.select(sa.func.count()).where(messages.c.chat_id == chat_id)
        assert (await conn.execute(count)).scalar_one() == 2
    book.rules = replace(book.rules, settles_orphans=False)
    opened, _ = await book.open("ned", chat_id, "third")
    assert opened.request.history == (ChatTurn("user", "hello"), ChatTurn("user", "first"))
    assert await open_reservations(book.engine, "ned") == 1


async def test_a_model_name_with_backslashes_whatever_the_servers_string_syntax(
    book: Chats, database_url: str
) -> None:
    """A server whose `standard_conforming_strings` is off reads a backslash in a plain
    '...' string as an escape: the model names written into the statement must read the
    same there (E'...'), or a name ending in a backslash breaks every opening."""
    if not book.transactor.writable_ctes:
        return  # SQLite writes no name into its statements
    name = "back\\'slash\\"
    async with book.engine.connect() as conn:
        database = (await conn.execute(sa.text("SELECT current_database()"))).scalar_one()
    alter = f'ALTER DATABASE "{database}" SET standard_conforming_strings = '
    async with book.engine.begin() as conn:
        await conn.execute(sa.text(alter + "off"))
    transactor = make_transactor(database_url, 30_000)
    try:
        await transactor.start()
        book.transactor = transactor
        book.rules = replace(
            book.rules, models={**MODELS, name: ModelLimits("", 900, 300, Decimal("2"))}
        )
        await book.user("olu")
        for model in ("small", name):
            chat_id = await book.chat("olu", model, [ChatTurn("user", "hello")])
            opened, statements = await book.open("olu", chat_id, "hi")
            assert (opened.model, statements) == (model, 1)
    finally:
        await transactor.close()
        async with book.engine.begin() as conn:
            await conn.execute(sa.text(alter + "DEFAULT"))


async def test_a_spend_limit_met_to_the_micro_by_the_reservations_rounded_up_price(
    book: Chats, database_url: str
) -> None:
    """The one statement prices its reservation in SQL (ceil of an exact numeric): a
    spend limit of exactly that rounded-up money reserves all of it in one statement;
    one micro less lowers the cap to what the money pays for (step by step)."""
    third = ModelLimits("", 900, 300, Decimal("0.333333333333"))
    history = [ChatTurn("user", "hello"), ChatTurn("assistant", "hi")]
    _, size, cap = fit_to_context(third, history, "next")
    need = reserve_micros(size + cap, third.highest_price)
    plans = {"exact": {"spend_limit": Decimal(need) / 10**6}}
    plans["short"] = {"spend_limit": Decimal(need - 1) / 10**6}
    settings = make_settings(database_url, default_token_limit=LIMIT, plans=plans)
    book.rules = replace(book.rules, models={**MODELS, "third": third}, plans=PlanBook.of(settings))
    for user, plan in (("pia", "exact"), ("quin", "short")):
        await book.user(user, plan)
        chat_id = await book.chat(user, "third", history)
        opened, statements = await book.open(user, chat_id, "next")
        if plan == "exact":
            assert (opened.reservation.tokens, opened.reservation.micros) == (size + cap, need)
            if book.transactor.writable_ctes:
                assert statements == 1
        else:
            tokens = int((Decimal(need - 1) / third.highest_price).to_integral_value("ROUND_FLOOR"))
            assert opened.reservation.tokens == tokens < size + cap
            assert opened.reservation.micros == reserve_micros(tokens, third.highest_price)
            assert opened.reservation.micros <= need - 1
