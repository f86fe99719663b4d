"""The transaction that opens an exchange (SPEC section 5): verify the chat, load its
history, fit the prompt to the model's context window, reserve the budget and save the
user message, all or nothing. A refusal raises `ApiError` and leaves nothing behind.

An exchange of the OpenAI-compatible endpoint (SPEC section 12) has no chat: the client
sends the whole conversation (`Prompt`), which is reserved for as sent and not stored.

It takes plain values only (`OpeningRules` holds what it needs of the settings): on
SQLite it runs in the writer process (`db/sqlite_process.py`). On PostgreSQL the common
case is one statement, one round trip (`_open_at_once`): the chat, its history fitted to
the context, the reservation and the user message."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

from chatmeter.chats.store import ChatRef, check_owned
from chatmeter.config import Settings
from chatmeter.db.steps import Conflict, Sql, Steps
from chatmeter.db.tables import utcnow
from chatmeter.errors import ApiError
from chatmeter.ids import new_id
from chatmeter.metering.budget import (
    ASKED,
    Ask,
    at_once_ctes,
    give_back_request,
    lock_active_chat,
    reserve_at_once,
    reserve_budget,
)
from chatmeter.metering.counting import (
    EXCHANGE_OVERHEAD_TOKENS,
    PER_MESSAGE_OVERHEAD,
    text_bound,
)
from chatmeter.metering.plans import PlanBook
from chatmeter.metering.reservations import (
    Reservation,
    lock_user,
    release_chat,
    release_reservation,
)
from chatmeter.providers.base import DEFAULT_SAMPLING, ChatTurn, GenerationRequest, Sampling


@dataclass(frozen=True, slots=True)
class ModelLimits:
    system_prompt: str
    context_window: int
    max_output_tokens: int
    highest_price: Decimal = Decimal(0)  # per token, in micro-units: what is reserved


@dataclass(frozen=True, slots=True)
class OpeningRules:
    """What opening an exchange needs of the configuration, made once per worker."""

    models: Mapping[str, ModelLimits]
    history_messages: int
    plans: PlanBook
    worker_id: str
    reservation_ttl_seconds: float
    writable_ctes: bool = False  # PostgreSQL: the common case is one statement
    # with Redis: an opening does not release a chat held by a dead process's
    # reservation (409); the sweeper settles that reply from its log first (`orphans.py`)
    settles_orphans: bool = False
    # PostgreSQL: the read and fit of `_open_at_once`, this worker's figures written in
    fitted_read_sql: str = field(init=False, default="", repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.writable_ctes:
            # a name with a NUL character cannot be a PostgreSQL string (nor a chat's
            # model there): written into the statement, it would break every opening
            models = {name: limits for name, limits in self.models.items() if "\x00" not in name}
            if models:
                fitted = _fitted_read(models, self.history_messages)
                object.__setattr__(self, "fitted_read_sql", fitted)

    @classmethod
    def of(cls, settings: Settings, worker_id: str, settles_orphans: bool) -> OpeningRules:
        return cls(
            models={
                name: ModelLimits(
                    settings.system_prompt_for(name),
                    config.context_window,
                    config.max_output_tokens,
                    config.prices.highest,
                )
                for name, config in settings.models.items()
            },
            history_messages=settings.history_messages,
            plans=PlanBook.of(settings),
            worker_id=worker_id,
            reservation_ttl_seconds=settings.reservation_ttl_seconds,
            writable_ctes=not settings.is_sqlite,
            settles_orphans=settles_orphans,
        )

    def reserve(
        self,
        user_id: str,
        chat_id: uuid.UUID | None,
        limits: ModelLimits,
        prompt_estimate: int,
        max_output_tokens: int,
        now: datetime,
        then: Sql | None = None,
        then_at_once: str = "",
        reservation_id: uuid.UUID | None = None,
        at_once: bool = True,
    ) -> Steps[Reservation]:
        """`reserve_budget` under this worker's plans, model prices and lease, then the
        write `then` in the same transaction. On PostgreSQL the common case is one
        statement (`reserve_at_once`), with `then_at_once`: the same write, its values
        selected `FROM held` (and cast: PostgreSQL cannot tell their types there), unless
        `at_once` is False (the caller's one statement was tried already).
        `reservation_id`: the reservation's id, when the caller chose it."""
        ask = self.ask(
            user_id,
            chat_id,
            limits.highest_price,
            prompt_estimate,
            max_output_tokens,
            now,
            reservation_id,
        )
        if self.writable_ctes:
            if at_once:
                params = then.params if then is not None else None
                said = f"said AS ({then_at_once})" if then_at_once else ""
                reserved = yield from reserve_at_once(ask, said, params)
                if reserved is not None:
                    return reserved
            if chat_id is not None:
                # the chat was read on its own: deleted since? (SQLite reads it in this
                # transaction, in the one writer)
                yield from lock_active_chat(chat_id)
        reservation = yield from reserve_budget(ask)
        if then is not None:
            yield then
        return reservation

    def ask(
        self,
        user_id: str,
        chat_id: uuid.UUID | None,
        highest_price: Decimal,
        prompt_estimate: int,
        max_output_tokens: int,
        now: datetime,
        reservation_id: uuid.UUID | None = None,
    ) -> Ask:
        """A reservation asked for under this worker's plans and lease."""
        return Ask(
            user_id,
            chat_id,
            prompt_estimate,
            max_output_tokens,
            self.plans,
            highest_price,
            self.worker_id,
            self.reservation_ttl_seconds,
            now,
            release_expired_claim=not self.settles_orphans,
            reservation_id=new_id() if reservation_id is None else reservation_id,
        )


@dataclass(frozen=True, slots=True)
class Opened:
    model: str
    request: GenerationRequest
    reservation: Reservation
    user_message_id: uuid.UUID | None  # None without a chat: nothing is saved
    user_message_at: datetime | None
    # the older turns of the chat's history that the prompt's bound left out, oldest
    # first: an exact count may put some back (`prompt_counts.with_counted_history`)
    dropped: tuple[ChatTurn, ...] = ()
    # the output cap asked for (the model's, or less if the client asked less): the
    # budget or the context may have lowered the request's below it, sizing the prompt
    # by its bound (`prompt_counts.with_counted_cap`); 0: not known
    output_asked: int = 0


@dataclass(frozen=True, slots=True)
class Prompt:
    """A conversation the client owns, sent as given: its system prompt (None: the
    model's), the turns before the last user message, that message, the most output
    the client asks for (None: the model's cap) and how to sample, passed on as asked."""

    model: str
    system_prompt: str | None
    history: tuple[ChatTurn, ...]
    message: str
    max_output_tokens: int | None
    sampling: Sampling = DEFAULT_SAMPLING

    def texts(self) -> list[str]:
        return [*(turn.content for turn in self.history), self.message]


class PromptTooLarge(Exception):
    """The byte bound of the bare message passes the context window: count it exactly.
    Carries the chat's model."""


def fit_to_context(
    limits: ModelLimits,
    history: Sequence[ChatTurn],
    message: str,
    exact_prompt: int | None = None,
    counts: Mapping[str, int] | None = None,
) -> tuple[tuple[ChatTurn, ...], int, int]:
    """Drop the oldest history until the prompt and the output cap fit the model's
    context window; lower the cap if even the bare message leaves too little room.
    Returns the history kept, the prompt size and the output cap. `exact_prompt`, the
    counted size of system prompt and message alone, replaces the bound (no history).
    The bound is `counting.text_bound` of each text, each measured once; `counts`, the
    model's tokenizer's count of texts (`message_size`), then sizes the prompt of the
    history the bound kept. The history stays the bound's choice: more of it, which the
    count may fit in the context, is put back only as far as the budget holds it too
    (`prompt_counts.with_counted_history`). Kept whole by count, it made the opening asked
    again after a budget refusal of the bound (`exchange._open_counted_chat`) refuse a
    budget with room for the counted prompt of the history the bound kept."""
    cap = limits.max_output_tokens
    if exact_prompt is not None:
        turns: Sequence[ChatTurn] = ()
        size = exact_prompt
    else:
        sizes = [text_bound(turn.content) for turn in history]
        size = (
            text_bound(limits.system_prompt)
            + text_bound(message)
            + sum(sizes)
            + EXCHANGE_OVERHEAD_TOKENS
        )
        dropped = 0
        while dropped < len(sizes) and size + cap > limits.context_window:
            size -= sizes[dropped]
            dropped += 1
        turns = history[dropped:]
        if counts:
            size = (
                message_size(limits.system_prompt, counts)
                + message_size(message, counts)
                + sum(message_size(turn.content, counts) for turn in turns)
                + EXCHANGE_OVERHEAD_TOKENS
            )
    room = limits.context_window - size
    if room < 1:
        if exact_prompt is None:
            raise PromptTooLarge
        raise ApiError(400, "INVALID_MESSAGE", "The message is too long for this chat's model.")
    return tuple(turns), size, min(cap, room)


def message_size(text: str, counts: Mapping[str, int]) -> int:
    """The most tokens `text` is as one message of a prompt: its count in `counts` (the
    model's tokenizer's) plus the chat template's PER_MESSAGE_OVERHEAD, as
    `counting.counted_prompt` adds them up, else its `text_bound`."""
    bound = text_bound(text)
    counted = counts.get(text)
    return bound if counted is None else min(bound, counted + PER_MESSAGE_OVERHEAD)


# the user message, saved by the opening: as a statement of its own, and as the last
# CTE of PostgreSQL's one-statement opening, written only if the reservation (`held`) was
_SAVE_USER_MESSAGE = (
    "INSERT INTO messages (message_id, chat_id, role, content, tokens_consumed, status, "
    "created_at) "
)
USER_MESSAGE = (
    _SAVE_USER_MESSAGE + "VALUES (:message_id, :chat_id, 'user', :content, 0, 'complete', :now)"
)
USER_MESSAGE_AT_ONCE = (
    _SAVE_USER_MESSAGE + "SELECT CAST(:message_id AS UUID), CAST(:chat_id AS UUID), 'user', "
    "CAST(:content AS TEXT), 0, 'complete', CAST(:now AS TIMESTAMPTZ) FROM held"
)


# a prompt's history: the chat's last `:count` messages with text, newest first (ties in
# time: the assistant's reply before the user message it answered, as it is reversed)
LATEST_MESSAGES = (
    "FROM messages WHERE chat_id = :chat_id AND content != '' "
    "ORDER BY created_at DESC, role ASC, message_id LIMIT :count"
)


def chat_and_history(
    chat_id: uuid.UUID, count: int
) -> Steps[tuple[ChatRef | None, list[ChatTurn]]]:
    """The chat and its last `count` messages, oldest first: one read."""
    rows = yield Sql(
        "SELECT 0 AS kind, user_id, model, is_active, NULL AS role, NULL AS content, "
        "NULL AS created_at, NULL AS message_id FROM chats WHERE chat_id = :chat_id UNION ALL "
        "SELECT 1, NULL, NULL, NULL, role, content, created_at, message_id FROM (SELECT "
        "role, content, "
        f"created_at, message_id {LATEST_MESSAGES}) AS recent "
        "ORDER BY kind, created_at DESC, role ASC, message_id",
        {"chat_id": chat_id, "count": count},
        alone=True,
    )
    if not rows or rows[0][0] != 0:
        return None, []
    _, user_id, model, is_active, *_ = rows[0]
    history = [ChatTurn(row[4], row[5]) for row in reversed(rows[1:])]
    return ChatRef(user_id, model, bool(is_active)), history


def open_steps(
    rules: OpeningRules,
    user_id: str,
    chat_id: uuid.UUID,
    message: str,
    exact_prompt: int | None,
    user_message_id: uuid.UUID,
    counts: Mapping[str, int] | None = None,
) -> Steps[Opened]:
    """The checks of the contract in order (chat 404/403, rate 429, budget 403, reply
    409), the history, the reservation (its output cap is the request's) and the user
    message, whose id the caller chose (`undo_opening` looks for it). On PostgreSQL the
    common case is one statement (`_open_at_once`); whatever it does not settle is done
    here, step by step. `counts`: texts the model's tokenizer counted, sized by their
    count instead of their bound (`fit_to_context`): the opening asked again after the
    bound was refused by the budget (`exchange.open_exchange`)."""
    now = utcnow()
    tried = bool(rules.fitted_read_sql) and exact_prompt is None and not counts
    read: tuple[ChatRef | None, list[ChatTurn]] | None = None
    if tried:
        answer = yield from _open_at_once(rules, user_id, chat_id, message, user_message_id, now)
        if isinstance(answer, Opened):
            return answer
        read = answer
    if read is None:  # not tried, or it broke a unique constraint and returned nothing
        read = yield from chat_and_history(chat_id, rules.history_messages)
    chat, history = read
    check_owned(chat, user_id)  # 404, then 403, as the contract orders them
    assert chat is not None
    limits = rules.models.get(chat.model)
    if limits is None:
        raise ApiError(400, "INVALID_REQUEST", f"model {chat.model!r} is not configured")
    try:
        kept, prompt_size, output_cap = fit_to_context(
            limits, history, message, exact_prompt, counts
        )
    except PromptTooLarge:
        raise PromptTooLarge(chat.model) from None
    reservation = yield from rules.reserve(
        user_id,
        chat_id,
        limits,
        prompt_size,
        output_cap,
        now,
        then=Sql(
            USER_MESSAGE,
            {"message_id": user_message_id, "chat_id": chat_id, "content": message, "now": now},
        ),
        then_at_once=USER_MESSAGE_AT_ONCE,
        at_once=not tried,
    )
    # the budget may allow less output than the context: the reservation's cap is sent
    request = GenerationRequest(limits.system_prompt, kept, message, reservation.output_cap)
    dropped = tuple(history[: len(history) - len(kept)])
    return Opened(
        chat.model, request, reservation, user_message_id, now, dropped, limits.max_output_tokens
    )


# PostgreSQL's opening of a chat in one statement: `open_steps`'s read, `fit_to_context`
# in SQL, and `reserve_at_once` with the user message. The prompt's bound is each text's
# UTF-8 bytes plus `PER_MESSAGE_OVERHEAD` (`counting.text_bound`; octet_length counts
# UTF-8 bytes in a UTF-8 database), summed newest first over the history (`upto`); a
# message is kept while the sum up to it, the system prompt, the message and the output
# cap fit the context window. The models' figures are written into the statement, joined
# to the chat's model.
def _fitted_read(models: Mapping[str, ModelLimits], history_messages: int) -> str:
    """The CTEs that read the chat and its history and fit the prompt (`ask`: the
    reservation's tokens and money). The models' figures and the history's length are
    written into the text, as the worker's constants: PostgreSQL then plans the statement
    once (a generic plan) instead of at every run, as it did while they were parameters
    whose values changed its estimates."""
    table = ", ".join(
        f"({_literal(name)}, {limits.context_window}, {limits.max_output_tokens}, "
        f"{text_bound(limits.system_prompt)}, CAST('{limits.highest_price}' AS NUMERIC))"
        for name, limits in models.items()
    )
    latest = LATEST_MESSAGES.replace(":count", str(int(history_messages)))
    return (
        "chat AS (SELECT user_id, model, is_active FROM chats "
        "WHERE chat_id = CAST(:chat_id AS UUID)), "
        "recent AS (SELECT role, content, "
        f"sum(octet_length(convert_to(content, 'UTF8')) + {PER_MESSAGE_OVERHEAD}) "
        "OVER (ORDER BY created_at DESC, role ASC, message_id "
        "ROWS UNBOUNDED PRECEDING) AS upto FROM (SELECT role, content, created_at, message_id "
        f"{latest}) AS latest), "
        "model AS (SELECT m.ctx, m.cap, m.price, m.base + CAST(:message_bound AS BIGINT) AS base "
        f"FROM chat JOIN (VALUES {table}) AS m(name, ctx, cap, base, price) "
        "ON m.name = chat.model "
        "WHERE chat.user_id = CAST(:user_id AS VARCHAR) AND chat.is_active), "
        "sized AS MATERIALIZED (SELECT model.*, model.base + COALESCE((SELECT max(upto) "
        "FROM recent "
        "WHERE model.base + upto + model.cap <= model.ctx), 0) AS size FROM model), "
        "fit AS (SELECT base, cap, ctx, size, LEAST(cap, ctx - size) AS output_cap, price "
        "FROM sized WHERE ctx - size >= 1), "
        "ask AS (SELECT size + output_cap AS tokens, "
        "CAST(ceil((size + output_cap) * price) AS BIGINT) AS micros FROM fit)"
    )


def _literal(text: str) -> str:
    """A string constant of SQL (a configured model's name), escaped (E'...') so that it
    reads the same whatever the server's `standard_conforming_strings`."""
    return "E'" + text.replace("\\", "\\\\").replace("'", "''") + "'"


# the chat's row (with the reservation's plan and figures when it was made), then its
# history newest first (`upto` grows in that order), each message with whether the
# prompt keeps it; every row begins with the user message's id, which tells apart the
# rows of openings sent together
_AT_ONCE_ANSWER = (
    "SELECT CAST(:message_id AS UUID) AS opening, 0 AS kind, chat.user_id, chat.model, "
    "chat.is_active, took.plan, fit.size, fit.output_cap, ask.micros, NULL AS role, "
    "NULL AS content, NULL AS kept, NULL AS upto FROM chat LEFT JOIN took ON TRUE "
    "LEFT JOIN fit ON TRUE LEFT JOIN ask ON TRUE UNION ALL "
    "SELECT CAST(:message_id AS UUID), 1, NULL, NULL, NULL, NULL, NULL, NULL, NULL, role, "
    "content, fit.base + upto + fit.cap <= fit.ctx, upto FROM recent "
    "LEFT JOIN fit ON TRUE ORDER BY kind, upto"
)


def _open_at_once(
    rules: OpeningRules,
    user_id: str,
    chat_id: uuid.UUID,
    message: str,
    user_message_id: uuid.UUID,
    now: datetime,
) -> Steps[Opened | tuple[ChatRef | None, list[ChatTurn]] | None]:
    """PostgreSQL: the whole opening in one statement when nothing refuses it and the
    prompt fits: `Opened`. Otherwise it wrote nothing and returns the chat and its
    history for `open_steps` to go on with (or None when the chat holds a reservation:
    a unique violation answers no rows)."""
    ask = rules.ask(user_id, chat_id, Decimal(0), 0, 0, now)  # the figures: SQL's (ASKED)
    ctes, params = at_once_ctes(ask, ASKED)
    said = f"said AS ({USER_MESSAGE_AT_ONCE})"
    try:
        rows = yield Sql(
            f"WITH {rules.fitted_read_sql}, {', '.join(ctes)}, {said} {_AT_ONCE_ANSWER}",
            {
                **params,
                "message_bound": text_bound(message) + EXCHANGE_OVERHEAD_TOKENS,
                "message_id": user_message_id,
                "content": message,
            },
            alone=True,
            keyed_by="message_id",
        )
    except Conflict:
        return None
    if not rows or rows[0][1] != 0:
        return None, []
    _, _, owner, model, is_active, plan, size, output_cap, micros, *_ = rows[0]
    history = rows[1:]
    if plan is None:
        turns = [ChatTurn(row[9], row[10]) for row in reversed(history)]
        return ChatRef(owner, model, bool(is_active)), turns
    marked = [(ChatTurn(row[9], row[10]), bool(row[11])) for row in reversed(history)]
    kept = tuple(turn for turn, fits in marked if fits)
    dropped = tuple(turn for turn, fits in marked if not fits)
    reservation = Reservation(
        ask.reservation_id, user_id, chat_id, size + output_cap, size, str(plan), micros
    )
    system_prompt = rules.models[model].system_prompt
    request = GenerationRequest(system_prompt, kept, message, output_cap)
    cap = rules.models[model].max_output_tokens
    return Opened(model, request, reservation, user_message_id, now, dropped, cap)


def undo_opening(
    user_id: str,
    chat_id: uuid.UUID,
    user_message_id: uuid.UUID,
    worker_id: str,
    book: PlanBook,
) -> Steps[bool]:
    """Take back an opening whose outcome is unknown (the SQLite writer process died
    before it answered): if it committed, its user message exists; then it is deleted,
    the chat's reservation released, which is the opening's (one per chat: a chat
    already held would have refused the opening), and, under the plans of `book`, its
    request no longer counts against the rate (the caller opens again: one request).
    True if there was something to undo."""
    yield from lock_user(user_id)
    rows = yield Sql(
        "DELETE FROM messages WHERE message_id = :id AND chat_id = :chat_id RETURNING role",
        {"id": user_message_id, "chat_id": chat_id},
    )
    if not rows:
        return False
    yield from release_chat(user_id, chat_id, worker_id)
    yield from give_back_request(user_id, book)
    return True


def undo_prompt_opening(user_id: str, reservation_id: uuid.UUID, book: PlanBook) -> Steps[bool]:
    """Take back an opening without a chat whose outcome is unknown (as `undo_opening`):
    it saved nothing but its reservation, whose id the caller chose. True if it had
    committed."""
    yield from lock_user(user_id)
    if not (yield from release_reservation(user_id, reservation_id)):
        return False
    yield from give_back_request(user_id, book)
    return True


def context_length_exceeded() -> ApiError:
    return ApiError(
        400, "CONTEXT_LENGTH_EXCEEDED", "The messages are too long for this model's context."
    )


def open_prompt_steps(
    rules: OpeningRules,
    user_id: str,
    prompt: Prompt,
    exact_prompt: int | None,
    reservation_id: uuid.UUID,
) -> Steps[Opened]:
    """Reserve for a whole conversation the client sent (no chat, nothing saved): the
    prompt's bound (or `exact_prompt`, its counted size) plus the output cap, which is
    the least of the client's, the model's, the context's room and the budget's. The
    reservation's id is the caller's (`undo_prompt_opening` looks for it)."""
    limits = rules.models[prompt.model]
    system = limits.system_prompt if prompt.system_prompt is None else prompt.system_prompt
    if exact_prompt is None:
        texts = [system, *prompt.texts()]
        size = sum(map(text_bound, texts)) + EXCHANGE_OVERHEAD_TOKENS
    else:
        size = exact_prompt
    room = limits.context_window - size
    if room < 1:
        if exact_prompt is None:
            raise PromptTooLarge(prompt.model)
        raise context_length_exceeded()
    asked = min(limits.max_output_tokens, prompt.max_output_tokens or limits.max_output_tokens)
    cap = min(asked, room)
    reservation = yield from rules.reserve(
        user_id, None, limits, size, cap, utcnow(), reservation_id=reservation_id
    )
    request = GenerationRequest(
        system, prompt.history, prompt.message, reservation.output_cap, prompt.sampling
    )
    return Opened(prompt.model, request, reservation, None, None, output_asked=asked)
