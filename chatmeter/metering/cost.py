"""What an exchange costs (SPEC section 10), exactly: prices are Decimals per million
tokens, so a price is also the cost of one token in micro-units (millionths of the
currency), and a cost is an integer of micro-units rounded half up once per exchange."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_HALF_UP, Context, Decimal

from chatmeter.providers.base import Usage

# enough digits for any token count times any price: no rounding before the one we want
_EXACT = Context(prec=60)
_ONE = Decimal(1)


@dataclass(frozen=True, slots=True)
class Prices:
    """Per million tokens, in the configured currency."""

    input: Decimal = Decimal(0)
    cached_input: Decimal = Decimal(0)
    output: Decimal = Decimal(0)
    thinking: Decimal = Decimal(0)

    @property
    def highest(self) -> Decimal:
        """The most one token can cost, in micro-units: what a reservation holds."""
        return max(self.input, self.cached_input, self.output, self.thinking)

    @property
    def is_free(self) -> bool:
        return self.highest == 0


def cost_micros(usage: Usage, prices: Prices) -> int:
    """`(prompt - cached) x input + cached x cached_input + completion x output +
    thinking x thinking`, in micro-units, rounded half up once."""
    cached = min(usage.cached_tokens, usage.prompt_tokens)
    exact = _EXACT.add(
        _EXACT.add(
            _EXACT.multiply(Decimal(usage.prompt_tokens - cached), prices.input),
            _EXACT.multiply(Decimal(cached), prices.cached_input),
        ),
        _EXACT.add(
            _EXACT.multiply(Decimal(usage.completion_tokens), prices.output),
            _EXACT.multiply(Decimal(usage.thinking_tokens), prices.thinking),
        ),
    )
    return int(exact.quantize(_ONE, rounding=ROUND_HALF_UP, context=_EXACT))


def reserve_micros(tokens: int, highest_price: Decimal) -> int:
    """The money `tokens` may cost at most: every one at the highest price, rounded up
    (a cost is rounded half up, so it never passes this)."""
    exact = _EXACT.multiply(Decimal(tokens), highest_price)
    return int(exact.quantize(_ONE, rounding=ROUND_CEILING, context=_EXACT))


def tokens_for_micros(micros: int, highest_price: Decimal) -> int | None:
    """The most tokens `micros` can pay for at the highest price; None when free."""
    if highest_price == 0:
        return None
    if micros <= 0:
        return 0
    return int(_EXACT.divide_int(Decimal(micros), highest_price))


def money(micros: int) -> Decimal:
    """Micro-units as an amount of the currency (for people: tables, CSV)."""
    return _EXACT.divide(Decimal(micros), Decimal(1_000_000))
