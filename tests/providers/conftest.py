from collections.abc import Iterator

import pytest

from tests.fakes.gemini_server import GeminiServer, running_gemini_server


@pytest.fixture
def gemini_server() -> Iterator[GeminiServer]:
    """A fresh loopback Gemini API for one test (its own thread, so any loop can use it)."""
    with running_gemini_server() as server:
        yield server
