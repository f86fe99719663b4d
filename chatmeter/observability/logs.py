"""Chat content stays out of the logs unless `log_content` is set.

chatmeter's own log lines name ids, never content. Some libraries it uses are less
careful at DEBUG: the OpenAI SDK logs each request's options (the prompt), httpx/httpcore
their traffic. So whatever level the root logger has, these log warnings and errors only.
(The database drivers the server uses, sqlite3 and asyncpg, log no statements.)"""

from __future__ import annotations

import logging

CONTENT_LOGGERS = (
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
        if logger.getEffectiveLevel() < logging.WARNING:
            logger.setLevel(logging.WARNING)
