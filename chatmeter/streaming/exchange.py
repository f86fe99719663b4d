"""One exchange, start to end (SPEC section 5), as one readable path:

    open_exchange:   verify chat -> load history -> reserve budget -> save user message
                     (one write transaction, `opening.py`; a refusal is a JSON error and
                     saves nothing)
    open_prompt_exchange: the same for a conversation the client sent (the
                     OpenAI-compatible endpoint): reserve budget, no chat, nothing saved
    Exchange.events: stream pieces from the provider as they arrive -> settle -> end event

Settlement runs on every path: the end, a stop, the client leaving, a provider failure.
It runs in a task of its own, so a cancellation cannot cut it short.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from chatmeter.auth.tokens import Principal
from chatmeter.db.steps import Steps
from chatmeter.db.transactor import OutcomeUnknown
from chatmeter.errors import ApiError
from chatmeter.ids import new_id
from chatmeter.metering.budget import BudgetRefused
from chatmeter.metering.cost import cost_micros
from chatmeter.metering.counting import (
    Metered,
)
from chatmeter.metering.reservations import Reservation
from chatmeter.metering.settlement import Settlement, settle_with_retries, settled_at
from chatmeter.providers.base import (
    GenerationRequest,
    Provider,
    ProviderError,
    StreamOutcome,
    Usage,
)
from chatmeter.services import Services
from chatmeter.streaming.events import end_event
from chatmeter.streaming.opening import (
    Opened,
    Prompt,
    PromptTooLarge,
    chat_and_history,
    context_length_exceeded,
    fit_to_context,
    open_prompt_steps,
    open_steps,
    undo_opening,
    undo_prompt_opening,
)
from chatmeter.streaming.prompt_counts import (
    count_bare_prompt,
    count_deadline,
    counted_size,
    local_counts,
    with_counted_cap,
    with_counted_history,
    worth_counting,
)
from chatmeter.streaming.text import storable

log = logging.getLogger("chatmeter.exchange")

STREAM_ERROR_MESSAGES = {
    "PROVIDER_ERROR": "The model failed while answering. Try again.",
    "PROVIDER_RATE_LIMITED": "The model is busy right now. Try again in a moment.",
    "PROVIDER_TIMEOUT": "The model stopped responding.",
    "CONTENT_BLOCKED": "The model declined to answer this.",
    "DATABASE_ERROR": "The reply could not be saved yet; it will be recorded shortly.",
    "INTERNAL_ERROR": "Something went wrong on our side.",
}


@dataclass(eq=False)
class Exchange:
    """An exchange whose checks passed: budget reserved, user message saved. Without a
    chat (`chat_id` None, the OpenAI-compatible endpoint) nothing of it is saved but its
    ledger row, keyed by `message_id`."""

    services: Services
    user_id: str
    chat_id: uuid.UUID | None
    model: str
    request: GenerationRequest
    reservation: Reservation
    user_message_id: uuid.UUID | None
    user_message_at: datetime | None
    message_id: uuid.UUID = field(default_factory=new_id)
    started: bool = False
    asked: bool = False  # whether the provider may have received the request
    billed: Metered | None = None  # what settlement billed, once it ran

    async def events(self) -> AsyncGenerator[dict[str, Any], None]:
        """Chunk events as the provider produces them, then the end (or error) event."""
        self.started = True
        services = self.services
        # a reply without a chat is known by its own id: only its client's leaving stops it
        reply = services.replies.register(
            self.message_id if self.chat_id is None else self.chat_id,
            self.reservation.reservation_id,
        )
        pieces: list[str] = []
        outcome = StreamOutcome()
        failure: ProviderError | None = None
        try:
            stream: AsyncGenerator[str, None] | None = None
            try:
                provider = await services.providers.get(self.model)
                stream = provider.stream(self.request, outcome)
                clock = asyncio.get_running_loop()
                while not reply.stop_requested:
                    self.asked = True  # from the first read on, the request may be out
                    # the registry's watchdog times out a read that waits too long
                    reply.waiting_since = clock.time()
                    try:
                        piece = await anext(stream)
                    except StopAsyncIteration:
                        break
                    finally:
                        reply.waiting_since = None
                    if piece:
                        piece = storable(piece)
                        pieces.append(piece)
                        yield {"chunk": piece, "done": False}
            except asyncio.CancelledError:
                if reply.timed_out:
                    _uncancel()
                    failure = ProviderError("PROVIDER_TIMEOUT", "the provider sent nothing in time")
                elif reply.stop_requested:
                    _uncancel()  # a stop: end normally
                else:
                    raise  # the job itself was cancelled
            except ProviderError as exc:
                failure = exc
            except Exception as exc:
                log.exception("provider %s failed unexpectedly", self.model)
                # the request may have reached the provider: bill what was counted
                failure = ProviderError("PROVIDER_ERROR", type(exc).__name__)
            finally:
                services.replies.unregister(reply)
                if stream is not None:
                    await stream.aclose()  # ends the upstream call
        except BaseException:
            # the job was cancelled, or its consumer closed it at a yield (a reader that
            # consumes events directly and left): the partial reply is saved and billed
            await self._finish("".join(pieces), "interrupted", outcome, None)
            raise
        status = "failed" if failure is not None else reply.stop_reason or "complete"
        yield await self._finish("".join(pieces), status, outcome, failure)

    async def close_unstarted(self) -> None:
        """The response never ran (the client left before it began): release the
        reservation. The provider was never called, so nothing is billed."""
        if not self.started:
            self.started = True
            metered = Metered(Usage(0, 0), "provider")
            await self._write(self._settlement("", "interrupted", None, metered))

    async def _finish(
        self, content: str, status: str, outcome: StreamOutcome, failure: ProviderError | None
    ) -> dict[str, Any]:
        # a task of its own: a second cancellation (shutdown) cannot cut settlement short
        task = self.services.spawn(self._meter_and_settle(content, status, outcome, failure))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            raise
        except Exception:
            # a bug, or the outbox's disk failing too: the stream still ends with an event
            log.exception("settlement of message %s failed", self.message_id)
            return self._error_event("INTERNAL_ERROR", 0)

    async def _meter_and_settle(
        self, content: str, status: str, outcome: StreamOutcome, failure: ProviderError | None
    ) -> dict[str, Any]:
        services = self.services
        refused = failure is not None and failure.before_output and not content
        if (refused or not self.asked) and outcome.usage is None:
            # refused up front, or never asked (the client left or stopped first)
            metered = Metered(Usage(0, 0), "provider")
        else:
            metered = await services.counter.meter(
                await self._provider_or_none(), self.request, content, outcome.usage
            )
        finish = _finish_reason(status, outcome)
        self.billed = metered
        settlement = self._settlement(content, status, finish, metered)
        saved = await self._write(settlement)
        usage = metered.usage
        if not saved:
            return self._error_event("DATABASE_ERROR", usage.total_tokens)
        if failure is not None:
            return self._error_event(failure.code, usage.total_tokens)
        return end_event(settlement, self.user_message_id)

    async def _provider_or_none(self) -> Provider | None:
        try:
            return await self.services.providers.get(self.model)
        except Exception:
            return None  # it failed to start: the exchange is estimated

    def _error_event(self, code: str, tokens_used: int) -> dict[str, Any]:
        return {
            "error": True,
            "code": code,
            "message": STREAM_ERROR_MESSAGES.get(code, STREAM_ERROR_MESSAGES["INTERNAL_ERROR"]),
            "message_id": str(self.message_id),
            "tokens_used": tokens_used,
        }

    def _settlement(
        self, content: str, status: str, finish: str | None, metered: Metered
    ) -> Settlement:
        created_at = settled_at(self.user_message_at)
        prices = self.services.settings.models[self.model].prices
        return Settlement(
            user_id=self.user_id,
            chat_id=self.chat_id,
            model=self.model,
            reservation_id=self.reservation.reservation_id,
            message_id=self.message_id,
            content=content,
            status=status,
            finish_reason=finish,
            usage=metered.usage,
            source=metered.source,
            created_at=created_at,
            cost_micros=cost_micros(metered.usage, prices),
        )

    async def _write(self, settlement: Settlement) -> bool:
        services = self.services
        try:
            await settle_with_retries(
                services.transactor,
                settlement,
                within_seconds=services.settings.settle_retry_seconds,
            )
        except Exception:
            services.metrics.settle_failures.inc()
            # never dropped: spooled to disk and replayed when the database is back
            try:
                services.outbox.append(settlement)
            except OSError:
                log.critical(
                    "settlement of message %s is in neither the database nor the outbox "
                    "(%s unwritable)",
                    settlement.message_id,
                    services.outbox.path,
                )
                raise
            return False
        services.metrics.count_settled(settlement)
        return True


# what messages.finish_reason holds: the provider names the reason, and a longer one
# (or one with a NUL) failed the settlement on PostgreSQL every time it was tried
FINISH_REASON_CHARS = 32


def _finish_reason(status: str, outcome: StreamOutcome) -> str:
    if status == "complete":
        return storable(outcome.finish_reason or "stop")[:FINISH_REASON_CHARS]
    return {"stopped": "stopped", "interrupted": "interrupted"}.get(status, "error")


def _uncancel() -> None:
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()


async def open_exchange(
    services: Services, user: Principal, chat_id: uuid.UUID, message: str
) -> Exchange:
    """The checks of the contract in order (chat 404/403, budget 403, reply 409), the
    history, the reservation and the user message: one write transaction, so a refusal
    leaves nothing behind. A budget refusal of the prompt's bound is asked again with
    the prompt counted, for a model that counts locally (`_open_counted_chat`)."""
    user_message_id = new_id()
    try:
        try:
            return await _open_chat(services, user, chat_id, message, None, user_message_id)
        except PromptTooLarge as too_large:
            exact = await count_bare_prompt(
                services,
                too_large.args[0],
                services.settings.system_prompt_for(too_large.args[0]),
                [message],
            )
            return await _open_chat(services, user, chat_id, message, exact, user_message_id)
        except BudgetRefused as refused:
            if not worth_counting(refused):
                raise
            opened = await _open_counted_chat(
                services, user, chat_id, message, user_message_id, refused.room
            )
            if opened is None:
                raise
            return opened
    except ApiError as exc:
        services.metrics.count_refusal(exc.code)
        raise


async def _open_counted_chat(
    services: Services,
    user: Principal,
    chat_id: uuid.UUID,
    message: str,
    user_message_id: uuid.UUID,
    room: int,
) -> Exchange | None:
    """The opening again, its prompt sized by the model's tokenizer's count (system
    prompt, history and message) where the bound made the budget refuse it: None when
    the model does not count locally, or the counted prompt does not fit `room` either
    (the refusal stands). The opening is the same one transaction, which reads the chat
    and checks every limit again: a text it reads that was not counted here (the chat
    moved on) is sized by its bound, so the reservation always holds the prompt sent."""
    chat, history = await services.transactor.run(
        chat_and_history, chat_id, services.settings.history_messages
    )
    if chat is None or chat.user_id != user.user_id or not chat.is_active:
        return None  # deleted or handed on since: the refusal stands
    limits = services.opening_rules.models.get(chat.model)
    if limits is None:
        return None
    texts = [limits.system_prompt, *(turn.content for turn in history), message]
    counts = await local_counts(services, chat.model, texts)
    if counts is None:
        return None
    try:
        _, size, _ = fit_to_context(limits, history, message, counts=counts)
    except PromptTooLarge:
        return None
    if size + 1 > room:
        return None
    return await _open_chat(services, user, chat_id, message, None, user_message_id, counts)


async def _open_chat(
    services: Services,
    user: Principal,
    chat_id: uuid.UUID,
    message: str,
    exact_prompt: int | None,
    user_message_id: uuid.UUID,
    counts: dict[str, int] | None = None,
) -> Exchange:
    async def undo() -> bool:
        return await services.transactor.run(
            undo_opening,
            user.user_id,
            chat_id,
            user_message_id,
            services.opening_rules.worker_id,
            services.plans,
        )

    args = (chat_id, message, exact_prompt, user_message_id, counts)
    return await _open_or_take_back(services, user, chat_id, open_steps, args, undo)


async def _open_or_take_back(
    services: Services,
    user: Principal,
    chat_id: uuid.UUID | None,
    steps: Callable[..., Steps[Opened]],
    args: tuple[object, ...],
    undo: Callable[[], Awaitable[bool]],
) -> Exchange:
    """`_open`, with `undo` (True if the opening had committed) for the two ways it can
    be left behind. The SQLite writer process died, or PostgreSQL's connection was lost,
    before it answered: it may have committed, and its reservation would hold the chat
    (409), the user's budget and a concurrent reply until its lease ran out; it is taken
    back, then opened again. The task that asked was cancelled (a shutdown) while it was
    out: it may commit with nobody to stream or settle it; it is taken back in a task of
    its own, once it has ended."""
    try:
        try:
            return await _open(services, user, chat_id, steps, *args)
        except OutcomeUnknown:
            undone = await undo()
            log.warning("the database was lost during an opening (committed: %s)", undone)
            return await _open(services, user, chat_id, steps, *args)
    except asyncio.CancelledError:
        services.spawn(_take_back_later(services, undo))
        raise


async def _take_back_later(services: Services, undo: Callable[[], Awaitable[bool]]) -> None:
    try:
        # once the opening has ended: the undo could otherwise run first (the opening
        # waiting for a lock before it takes the user's row), find nothing, and the
        # opening commit after it
        log.info("an opening whose request was cancelled is taken back once it ends")
        await services.transactor.caught_up()
        if await undo():
            log.warning("an opening whose request was cancelled was taken back")
    except Exception:
        log.exception("an opening whose request was cancelled could not be taken back")


async def open_prompt_exchange(services: Services, user: Principal, prompt: Prompt) -> Exchange:
    """An exchange for a conversation the client sent (SPEC section 12): the same
    reservation, provider, metering and settlement as a chat's, with no chat. Refusals:
    budget 403, context 400 (`ApiError`)."""
    reservation_id = new_id()
    system = prompt.system_prompt
    if system is None:
        system = services.settings.system_prompt_for(prompt.model)
    try:
        try:
            return await _open_prompt(services, user, prompt, None, reservation_id)
        except PromptTooLarge:
            exact = await count_bare_prompt(
                services, prompt.model, system, prompt.texts(), context_length_exceeded
            )
            return await _open_prompt(services, user, prompt, exact, reservation_id)
        except BudgetRefused as refused:
            # the bound may be what the budget refused: counted, the prompt may fit
            if not worth_counting(refused):
                raise
            counted = await counted_size(services, prompt.model, system, prompt.texts())
            if counted is None or counted + 1 > refused.room:
                raise
            return await _open_prompt(services, user, prompt, counted, reservation_id)
    except ApiError as exc:
        services.metrics.count_refusal(exc.code)
        raise


async def _open_prompt(
    services: Services,
    user: Principal,
    prompt: Prompt,
    exact_prompt: int | None,
    reservation_id: uuid.UUID,
) -> Exchange:
    async def undo() -> bool:
        return await services.transactor.run(
            undo_prompt_opening, user.user_id, reservation_id, services.plans
        )

    args = (prompt, exact_prompt, reservation_id)
    return await _open_or_take_back(services, user, None, open_prompt_steps, args, undo)


async def _open(
    services: Services,
    user: Principal,
    chat_id: uuid.UUID | None,
    steps: Callable[..., Steps[Opened]],
    *args: object,
) -> Exchange:
    """Run an opening transaction, `steps(rules, user_id, *args)`, and make its exchange.
    It goes with the others of the moment (`run_together`: on PostgreSQL a chat's
    opening is one statement keyed by its user message)."""
    opened = await services.transactor.run_together(
        user.user_id, steps, services.opening_rules, user.user_id, *args
    )
    # the counts after the opening hold the reply up HISTORY_COUNT_SECONDS at most, all
    deadline = count_deadline()
    request, reservation = await with_counted_history(services, opened, deadline)
    request, reservation = await with_counted_cap(services, opened, request, reservation, deadline)
    return Exchange(
        services=services,
        user_id=user.user_id,
        chat_id=chat_id,
        model=opened.model,
        request=request,
        reservation=reservation,
        user_message_id=opened.user_message_id,
        user_message_at=opened.user_message_at,
    )
