"""Whether the database answers (`/readyz`), asked the way every query is: a step."""

from __future__ import annotations

from chatmeter.db.steps import Sql, Steps


def database_answers() -> Steps[None]:
    yield Sql("SELECT 1", {}, alone=True)
