"""Crafted `before` cursors (issue 12, break 2): a cursor is opaque, but a client can
make one. One naming a moment that is not a moment in UTC (year 1 at +14:00 is in year
0; year 9999 at -14:00 is in year 10000) or a moment without a zone is 400
INVALID_REQUEST, never a 500; the extreme moments that exist page as any other."""

from __future__ import annotations

import base64
import uuid

import httpx
import pytest

from tests.conftest import auth
from tests.hostile.test_bodies import assert_error

USER = "carol-hostile-cursors"
PATHS = ("/api/chat", "/api/usage/events")


def cursor(moment: str, item_id: uuid.UUID | str | None = None) -> str:
    raw = f"{moment}|{item_id or uuid.uuid4()}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "moment",
    [
        "0001-01-01T00:00:00+14:00",
        "0001-01-01T13:59:59.999999+14:00",
        "9999-12-31T23:59:59.999999-14:00",
        "9999-12-31T10:00:00-14:00",
        "2024-01-01T00:00:00",  # no zone: never made by this API
        "0001-01-01T00:00:00",
    ],
)
async def test_a_cursor_naming_no_moment_in_utc_is_400(
    client: httpx.AsyncClient, path: str, moment: str
) -> None:
    response = await client.get(path, params={"before": cursor(moment)}, headers=auth(USER))
    assert_error(response, 400, "INVALID_REQUEST")
    # the connection is still good, and so is the server
    assert (await client.get(path, headers=auth(USER))).status_code == 200


@pytest.mark.parametrize("path", PATHS)
async def test_the_extreme_moments_that_exist_page_as_any_other(
    client: httpx.AsyncClient, path: str
) -> None:
    await client.post("/api/chat", json={"title": "one"}, headers=auth(USER))
    for moment, expected in (
        ("0001-01-01T00:00:00+00:00", 0),  # before the first moment: nothing
        ("0001-01-01T14:00:00+14:00", 0),
        ("9999-12-31T23:59:59.999999+00:00", None),  # after the last: everything
        ("9999-12-31T09:59:59.999999-14:00", None),
    ):
        response = await client.get(path, params={"before": cursor(moment)}, headers=auth(USER))
        assert response.status_code == 200, (moment, response.text)
        items = response.json()["chats" if path == "/api/chat" else "events"]
        if expected == 0:
            assert items == []
        elif path == "/api/chat":
            assert len(items) == 1
