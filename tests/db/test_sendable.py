"""What crosses to the SQLite writer process comes back equal, field for field."""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from datetime import UTC, datetime

from chatmeter.config import Settings
from chatmeter.db.sqlite_process import Encoder
from chatmeter.ids import new_id
from chatmeter.metering.plans import PlanBook
from chatmeter.metering.reservations import Reservation
from chatmeter.metering.settlement import Settlement
from chatmeter.providers.base import ChatTurn, GenerationRequest, Sampling, Usage
from chatmeter.streaming.opening import ModelLimits, Opened, OpeningRules, Prompt


def test_transaction_values_round_trip_through_pickle() -> None:
    at = datetime(2026, 11, 24, 2, 30, tzinfo=UTC)
    values = [
        Settlement(
            "u",
            new_id(),
            "m",
            new_id(),
            new_id(),
            "reply",
            "complete",
            "stop",
            Usage(3, 4, thinking_tokens=5, cached_tokens=1),
            "provider",
            at,
        ),
        OpeningRules(
            {"m": ModelLimits("be brief", 8192, 1024)}, 20, PlanBook.of(Settings()), "w", 30.0
        ),
        Opened(
            "m",
            GenerationRequest(
                "be brief", (ChatTurn("user", "hi"), ChatTurn("assistant", "yo")), "q", 9
            ),
            Reservation(new_id(), "u", new_id(), 100, 20),
            new_id(),
            at,
        ),
        Prompt("m", None, (), "q", None, Sampling(0.5, 1.0, ("END", "\n"))),
        GenerationRequest("s", (), "q", 9, Sampling(top_p=0.9)),
    ]
    encoder = Encoder()  # one for all, as a transactor's: what it learns of a class holds
    for value in [*values, *values]:
        copy = pickle.loads(encoder.dumps(value))  # as the writer's pipe carries it
        assert copy == value and type(copy) is type(value)


def test_what_a_value_derives_in_post_init_is_derived_again() -> None:
    # PostgreSQL's rules write their one statement's text when made (a field with
    # init=False): the class is called with its __init__ fields only
    rules = OpeningRules(
        {"m": ModelLimits("be brief", 8192, 1024)},
        20,
        PlanBook.of(Settings()),
        "w",
        30.0,
        writable_ctes=True,
    )
    assert rules.fitted_read_sql
    copy = pickle.loads(Encoder().dumps(rules))
    assert copy == rules and copy.fitted_read_sql == rules.fitted_read_sql


@dataclass(frozen=True, slots=True)
class _Base:
    first: str


@dataclass(frozen=True, slots=True)
class _Derived(_Base):
    second: int
    third: tuple[str, ...] = field(kw_only=True, default=())


@dataclass(frozen=True, slots=True)
class _Positional(_Base):
    second: int


def test_inherited_fields_and_keyword_only_fields_round_trip() -> None:
    # a subclass's __slots__ name its own fields only; a keyword-only field cannot be
    # passed by position: each is rebuilt with every field
    encoder = Encoder()
    for value in [_Base("z"), _Positional("a", 1), _Derived("b", 2, third=("c",))]:
        assert pickle.loads(encoder.dumps(value)) == value
