"""The end event of a reply (SPEC section 5), made from its settlement: by the exchange
that generated the reply, or by the process that settled it after its own died
(`orphans.py`)."""

from __future__ import annotations

import uuid
from typing import Any

from chatmeter.metering.settlement import Settlement


def end_event(settlement: Settlement, user_message_id: uuid.UUID | None) -> dict[str, Any]:
    usage = settlement.usage
    return {
        "chunk": "",
        "done": True,
        "tokens_used": usage.total_tokens,
        "message_id": str(settlement.message_id),
        "user_message_id": None if user_message_id is None else str(user_message_id),
        "finish_reason": settlement.finish_reason,
        "usage": {
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "thinking_tokens": usage.thinking_tokens,
            "cached_tokens": usage.cached_tokens,
            "total_tokens": usage.total_tokens,
            "source": settlement.source,
            "cost_micros": settlement.cost_micros,
        },
    }
