"""The exact counts an opening may ask for, beside the byte bound it reserves by
(`counting.text_bound`), for models whose tokenizer costs no provider call
(`Provider.counts_locally`): a long message the bound says may not fit; a budget
refusal the bound may have caused; the history the bound left out; an output cap it
lowered. A provider whose count is an API call is never asked here (SPEC section 9:
zero count calls per exchange when usage is reported)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import replace

from chatmeter.db.tables import utcnow
from chatmeter.errors import ApiError
from chatmeter.metering.budget import BudgetRefused, widen_reservation
from chatmeter.metering.counting import (
    EXCHANGE_OVERHEAD_TOKENS,
    PER_MESSAGE_OVERHEAD,
    counted_prompt,
)
from chatmeter.metering.reservations import Reservation
from chatmeter.providers.base import GenerationRequest
from chatmeter.services import Services
from chatmeter.streaming.opening import ModelLimits, Opened

log = logging.getLogger("chatmeter.exchange")

# the longest an opening waits for the count that puts history back: the reply is not
# held up for it longer than that (the provider's own timeout may be a minute)
HISTORY_COUNT_SECONDS = 2.0


def message_too_long() -> ApiError:
    return ApiError(400, "INVALID_MESSAGE", "The message is too long for this chat's model.")


async def count_bare_prompt(
    services: Services,
    model: str,
    system: str,
    texts: list[str],
    refusal: Callable[[], ApiError] = message_too_long,
) -> int:
    """The exact size of system prompt plus `texts` with the model's tokenizer: only
    asked when the cheap bound says they may not fit (long non-ASCII text), so such a
    prompt is refused only when it really does not fit."""
    try:
        provider = await services.providers.get(model)
        counts = await services.counter.count(provider, system, texts)
    except Exception:
        raise refusal() from None
    return counted_prompt(counts, len(texts))


# the least a prompt of one message can be by exact count: the template's tokens of the
# system prompt and the message, and the exchange's overhead (`counted_prompt`). A budget
# with less room than that (and one token of output) is spent whatever the count says:
# its refusal stands without one
SMALLEST_COUNTED_PROMPT = 2 * PER_MESSAGE_OVERHEAD + EXCHANGE_OVERHEAD_TOKENS


def worth_counting(refused: BudgetRefused) -> bool:
    """Whether a budget refusal may be the prompt's bound's doing: the limits still held
    room for some prompt and a token of output."""
    return refused.room >= SMALLEST_COUNTED_PROMPT + 1


def count_deadline() -> float:
    """The loop time by which the counts of one opening give up: HISTORY_COUNT_SECONDS
    from now, for all of them together (the history's, then the output cap's: each
    waiting for it in turn, a tokenizer that hangs held the reply up twice as long)."""
    return asyncio.get_running_loop().time() + HISTORY_COUNT_SECONDS


async def local_counts(
    services: Services, model: str, texts: list[str], deadline: float | None = None
) -> dict[str, int] | None:
    """Each of `texts` counted by the model's tokenizer, if it counts locally (no
    provider call: `Provider.counts_locally`) and by `deadline` (`count_deadline`, from
    now if not given); else None (a provider whose count is an API call keeps zero
    count calls per exchange, SPEC section 9). A deadline already passed asks nothing."""
    if deadline is None:
        deadline = count_deadline()
    elif deadline <= asyncio.get_running_loop().time():
        return None
    try:
        provider = await services.providers.get(model)
        if not provider.counts_locally:
            return None
        distinct = list(dict.fromkeys(texts))
        async with asyncio.timeout_at(deadline):
            sizes = await services.counter.sizes(provider, distinct)
    except Exception:
        log.warning("a prompt could not be counted; its bound stands", exc_info=True)
        return None
    return dict(zip(distinct, sizes, strict=True))


async def counted_size(
    services: Services, model: str, system: str, texts: list[str], deadline: float | None = None
) -> int | None:
    """The prompt of `system` and `texts` by `local_counts`, with its template's and the
    exchange's overhead (`counted_prompt`); None when it is not counted."""
    counts = await local_counts(services, model, [system, *texts], deadline)
    if counts is None:
        return None
    return counted_prompt(sum(counts[text] for text in [system, *texts]), len(texts))


async def with_counted_history(
    services: Services, opened: Opened, deadline: float
) -> tuple[GenerationRequest, Reservation]:
    """The opening's request, with the newest of the turns its bound left out put back
    as far as the model's context window holds them by exact count, and its reservation,
    grown to hold them. The bound (UTF-8 bytes) runs 3-4x the real count of English
    text, so it trims a chat's history long before the context window is full (SPEC
    section 5 trims only what would overflow it). Only for a model whose tokenizer costs
    no provider call (`Provider.counts_locally`): no count call otherwise.

    What the prompt's reservation already holds is put back at no cost; more takes a
    second, atomic take on the user's budget (`budget.widen_reservation`, one statement
    more, only for such trimmed chats): if the limits do not hold it, the prompt stays
    within the reservation the opening made. Either way the prompt sent stays within
    what is reserved. A count that fails, or is not done by `deadline` (`count_deadline`:
    a tokenizer that hangs), changes nothing."""
    request, reservation = opened.request, opened.reservation
    if not opened.dropped:
        return request, reservation
    try:
        provider = await services.providers.get(opened.model)
        if not provider.counts_locally:
            return request, reservation
        counter = services.counter
        texts = [*(turn.content for turn in request.history), request.message]
        async with asyncio.timeout_at(deadline):
            size = counted_prompt(
                await counter.count(provider, request.system_prompt, texts), len(texts)
            )
            older = await counter.sizes(provider, [turn.content for turn in opened.dropped])
    except Exception:
        log.warning("the history left out could not be counted; sent without it", exc_info=True)
        return request, reservation
    # the newest turns first, each with its template's tokens: `sums[n]`, the last n
    added = [tokens + PER_MESSAGE_OVERHEAD for tokens in reversed(older)]
    sums = [sum(added[:n]) for n in range(len(added) + 1)]
    back = _fitting(sums, reservation.prompt_estimate - size)
    limits = services.opening_rules.models.get(opened.model)
    if limits is not None:
        # the context leaves room for the model's whole output cap, as `fit_to_context`
        wanted = _fitting(sums, limits.context_window - limits.max_output_tokens - size)
        if wanted > back:
            widened = await _widened(services, reservation, size + sums[wanted], limits)
            if widened is not None:
                reservation, back = widened, wanted
    if back == 0:
        return request, reservation
    history = (*opened.dropped[len(older) - back :], *request.history)
    return replace(request, history=history), reservation


async def with_counted_cap(
    services: Services,
    opened: Opened,
    request: GenerationRequest,
    reservation: Reservation,
    deadline: float,
) -> tuple[GenerationRequest, Reservation]:
    """The request with the output cap the reservation holds once its prompt is counted,
    where the budget or the context lowered it below the one asked for: the opening
    reserved the prompt's bound (3-4x the real count of English) and gave the output
    what was left of it, so near the end of a budget a reply was cut short by tokens the
    prompt never used. The reservation's tokens (and money) stay as they are, and the
    budget with them: only its split between prompt and output moves, the prompt part
    still holding the counted prompt that is sent, prompt and cap within the context.
    Only for a model that counts locally and a lowered cap; a count that fails or hangs
    changes nothing (by `deadline`, the one of `with_counted_history`'s count)."""
    if request.max_output_tokens >= opened.output_asked:
        return request, reservation
    limits = services.opening_rules.models.get(opened.model)
    texts = [*(turn.content for turn in request.history), request.message]
    size = await counted_size(services, opened.model, request.system_prompt, texts, deadline)
    if limits is None or size is None:
        return request, reservation
    cap = min(opened.output_asked, limits.context_window - size, reservation.tokens - size)
    if cap <= request.max_output_tokens:
        return request, reservation
    reservation = replace(reservation, prompt_estimate=reservation.tokens - cap)
    return replace(request, max_output_tokens=cap), reservation


def _fitting(sums: list[int], room: int) -> int:
    """How many of the newest turns fit `room` (`sums[n]`: the last n's tokens)."""
    return max((n for n, total in enumerate(sums) if total <= room), default=0)


async def _widened(
    services: Services, reservation: Reservation, prompt: int, limits: ModelLimits
) -> Reservation | None:
    """The reservation grown to hold a prompt of `prompt` tokens, or None when the user's
    limits do not hold the difference (or it could not be written: then whatever was
    written holds in the reservation's row, which is what settlement hands back)."""
    try:
        return await services.transactor.run(
            widen_reservation,
            services.plans,
            reservation,
            prompt - reservation.prompt_estimate,
            limits.highest_price,
            utcnow(),
        )
    except Exception:
        log.warning("the reservation could not be widened for history", exc_info=True)
        return None
