"""The cost of an exchange (SPEC section 10): exact decimals, micro-units, rounded half
up once per exchange."""

from __future__ import annotations

from decimal import Decimal

import pytest

from chatmeter.metering.cost import Prices, cost_micros, reserve_micros, tokens_for_micros
from chatmeter.providers.base import Usage

FLASH = Prices(
    input=Decimal("0.30"),
    cached_input=Decimal("0.075"),
    output=Decimal("2.50"),
    thinking=Decimal("3.50"),
)
TENTH = Prices(Decimal("0.1"), Decimal("0.1"), Decimal("0.1"), Decimal("0.1"))


@pytest.mark.parametrize(
    ("usage", "prices", "micros"),
    [
        # (999 x 0.30) + (2 x 0.075) + (3 x 2.50) + (1 x 3.50) = 310.85 -> 311
        (Usage(1001, 3, thinking_tokens=1, cached_tokens=2), FLASH, 311),
        # exactly half: up, not to even (banker's rounding would give 0 and 2)
        (Usage(5, 0), TENTH, 1),
        (Usage(25, 0), TENTH, 3),
        (Usage(15, 0), TENTH, 2),
        # rounded once: 0.4 + 0.4 = 0.8 -> 1 (rounding each part first would give 0)
        (Usage(4, 4), TENTH, 1),
        # 0.075 x 6 = 0.45 -> 0; 0.075 x 7 = 0.525 -> 1
        (Usage(6, 0, cached_tokens=6), FLASH, 0),
        (Usage(7, 0, cached_tokens=7), FLASH, 1),
        # 0.1 x 3 is 0.3 exactly, where binary floats give 0.30000000000000004
        (Usage(30_000_000, 0), TENTH, 3_000_000),
        (Usage(0, 0), FLASH, 0),
        # big figures stay exact: 10^12 tokens at 2.50 = 2.5 x 10^12 micro-units
        (Usage(0, 10**12), FLASH, 2_500_000_000_000),
    ],
)
def test_cost_is_exact_and_rounded_half_up_once(usage: Usage, prices: Prices, micros: int) -> None:
    assert cost_micros(usage, prices) == micros


def test_a_model_without_prices_costs_nothing() -> None:
    assert cost_micros(Usage(10**9, 10**9, 10**9, 10**6), Prices()) == 0
    assert Prices().is_free and tokens_for_micros(5, Prices().highest) is None


def test_reservation_holds_every_token_at_the_highest_price_rounded_up() -> None:
    assert FLASH.highest == Decimal("3.50")
    assert reserve_micros(3, Decimal("3.50")) == 11  # 10.5 -> 11: never below a cost
    assert reserve_micros(4, Decimal("3.50")) == 14
    assert tokens_for_micros(11, Decimal("3.50")) == 3
    assert tokens_for_micros(0, Decimal("3.50")) == 0
    assert tokens_for_micros(-5, Decimal("3.50")) == 0
    # whatever the mix of an exchange's tokens, its cost fits what was reserved
    for prompt in range(0, 40, 7):
        for completion in range(0, 40, 9):
            usage = Usage(prompt, completion, thinking_tokens=prompt % 3, cached_tokens=prompt // 2)
            held = reserve_micros(usage.total_tokens, FLASH.highest)
            assert cost_micros(usage, FLASH) <= held
