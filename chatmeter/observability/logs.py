"""Chat content stays out of the logs unless `log_content` is set.

chatmeter's own log lines name ids, never content. Some libraries it uses are less
careful at DEBUG: aiosqlite logs every statement with its parameters, SQLAlchemy the rows
it fetches, the OpenAI SDK each request's options (the prompt), httpx/httpcore traffic.
So whatever level the root logger has, these log at INFO at most."""

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
        if logger.level < logging.INFO:  # NOTSET too: it would follow the root down
            logger.setLevel(logging.INFO)
