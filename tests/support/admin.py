"""What tests ask of the admin API to set a scene."""

from __future__ import annotations

import httpx

from tests.conftest import auth


async def set_token_limit(http: httpx.AsyncClient, user: str, limit: int) -> None:
    """Put the user's token limit at `limit` (`PUT /api/admin/users/{id}/limit`)."""
    limited = await http.put(
        f"/api/admin/users/{user}/limit",
        json={"token_limit": limit},
        headers=auth("root", admin=True),
    )
    assert limited.status_code == 200, limited.text
