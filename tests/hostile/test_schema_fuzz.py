"""schemathesis against /openapi.json of a real server: no 5xx, and every answer (status,
content type, body, each event of the stream) is what the description documents. Schema-
valid and schema-invalid data, with a normal user's token everywhere and an admin's token
on /api/admin. Nothing is excluded."""

from __future__ import annotations

import asyncio
import traceback
from collections import Counter
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Err
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import auth, make_settings, scripted
from tests.support.server import serve

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
    ignored_auth,  # a success with the token is a 401 without it, or with a bad one
]
USER = "fuzz-user"
ADMIN = "fuzz-admin"
# per operation and mode; PostgreSQL runs fewer (the same code paths, slower per request)
EXAMPLES = {"sqlite": 50, "postgres": 30}
CHATS_PER_OPERATION = 2


class Fuzzer:
    def __init__(self, base_url: str, chats: dict[str, list[str]], examples: int) -> None:
        self.base_url = base_url
        self.chats = chats
        self.examples = examples
        self.calls: Counter[str] = Counter()
        self.failures: list[str] = []

    def run(self) -> None:
        schema = schemathesis.openapi.from_url(self.base_url + "/openapi.json")
        for result in schema.get_all_operations():
            if isinstance(result, Err):  # a part of the description it cannot read
                self.failures.append(f"invalid schema: {result.err()}")
                continue
            operation = result.ok()
            for mode in GenerationMode:
                self._fuzz(operation, mode)

    def _strategy(self, operation: Any, mode: GenerationMode) -> Any:
        admin = operation.path.startswith("/api/admin")
        headers = auth(ADMIN, admin=True) if admin else auth(USER)
        strategies = [operation.as_strategy(mode, headers=headers)]
        # a generated UUID is never a chat: aim at real chats of the user as well
        for chat_id in self.chats.get(operation.path, []):
            path = {"chat_id": chat_id}
            strategies.append(operation.as_strategy(mode, headers=headers, path_parameters=path))
        return st.one_of(strategies)

    def _fuzz(self, operation: Any, mode: GenerationMode) -> None:
        label = f"[{mode}] {operation.label}"

        @settings(
            max_examples=self.examples,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=self._strategy(operation, mode))
        def run(case: Any) -> None:
            self.calls[label] += 1
            case.call_and_validate(base_url=self.base_url, checks=CHECKS, timeout=30)

        try:
            run()
        except Unsatisfiable:
            # nothing in this operation can be made invalid (no parameters, no body)
            assert mode is GenerationMode.NEGATIVE, label
        except (Exception, BaseExceptionGroup) as exc:  # schemathesis raises a FailureGroup
            self.failures.append(f"{label}: {''.join(traceback.format_exception_only(exc))}")


async def make_chats(client: httpx.AsyncClient, spec: dict[str, Any]) -> dict[str, list[str]]:
    """Real chats of USER for each path with a chat in it."""
    chats: dict[str, list[str]] = {}
    for path in spec["paths"]:
        if "{chat_id}" not in path:
            continue
        for _ in range(CHATS_PER_OPERATION):
            created = await client.post("/api/chat", json={}, headers=auth(USER))
            assert created.status_code == 201, created.text
            chats.setdefault(path, []).append(created.json()["chat_id"])
    return chats


async def test_schemathesis_finds_nothing(
    database_url: str, backend: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # Hypothesis keeps caches even with no example database: not in the working tree
    set_hypothesis_home_dir(tmp_path_factory.mktemp("hypothesis"))
    config = make_settings(
        database_url,
        outbox_dir=str(tmp_path_factory.mktemp("outbox")),
        # every configured model is a `model` the description offers to /v1: the
        # built-in `local` one is scripted here, so the fuzzer never waits on llama.cpp
        models={"local": scripted(reply="A short scripted reply.", chunks=3)},
    )
    async with serve(config) as server:
        async with httpx.AsyncClient(base_url=server.url) as client:
            spec = (await client.get("/openapi.json")).json()
            chats = await make_chats(client, spec)
        fuzzer = Fuzzer(server.url, chats, EXAMPLES[backend])
        # schemathesis calls with blocking `requests`: off the loop that runs the server
        await asyncio.to_thread(fuzzer.run)
    assert not fuzzer.failures, "\n\n".join(fuzzer.failures)
    positive = [label for label in fuzzer.calls if label.startswith("[positive]")]
    operations = sum(len(methods) for methods in spec["paths"].values())
    assert len(positive) == operations, sorted(fuzzer.calls)
    # an operation that takes no input has one case; the others had their full run
    assert sum(fuzzer.calls.values()) > operations * EXAMPLES[backend], fuzzer.calls
