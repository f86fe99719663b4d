"""Chat content stays out of the logs unless `log_content` is set.

chatmeter's own log lines name ids, never content. Some libraries it uses are less
careful at DEBUG: aiosqlite logs every statement with its parameters, SQLAlchemy the rows
it fetches, the OpenAI SDK each request's options (the prompt), httpx/httpcore traffic.
So whatever level the root logger has, these log warnings and errors only."""

from __future__ import annotations

import logging

CONTENT_LOGGERS = (
    "aiosqlite",
    "sqlalchemy.engine",
    "openai",
    "google_genai",
    "httpx",
    "httpx2",
    "httpcore",
    "httpcore2",
)


def keep_content_out_of_logs(log_content: bool) -> None:
    if log_content:
        return
    for name in CONTENT_LOGGERS:
        logger = logging.getLogger(name)
        # WARNING, not INFO: SQLAlchemy logs every statement once its logger allows INFO
        if logger.getEffectiveLevel() < logging.WARNING:
            logger.setLevel(logging.WARNING)
