"""Faults of the SQLite writer process, caused from inside it: transaction steps that
the writer process runs like any other (it imports this module by name)."""

from __future__ import annotations

import os
import select
import signal
import sys
from pathlib import Path
from typing import Any

from chatmeter.db import sqlite_process
from chatmeter.db.steps import Steps


def hold_then_die_answering_the_next_batch(marker: str) -> Steps[None]:
    """Make this process die (SIGKILL) after it commits the next batch and before it
    answers it; then hold this batch, `marker` created, until the next job has arrived.
    The caller sends this with two `nothing()` (three jobs in one turn go to the
    process, not inline) and, while it holds, the transaction to be lost."""
    # the process runs `python -m chatmeter.db.sqlite_process`: its module is __main__
    process = sys.modules["__main__"]
    assert process.__file__ == sqlite_process.__file__

    def die(fd: int, data: bytes) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    # this batch's answer is already on its way to the original (the call's function is
    # looked up before its arguments run this step): the next batch's is not
    vars(process)["_write_all"] = die  # the global that `serve` calls
    Path(marker).touch()
    select.select([0], [], [], 120)  # the jobs' pipe: until the next job is here
    return None
    yield  # a transaction's steps, with no statement


def nothing() -> Steps[Any]:
    return None
    yield


def hold_the_answer_to_the_next_batch(marker: str, committed: str, release: str) -> Steps[None]:
    """Make this process hold the answer to the next batch it commits: `committed` is
    created once that batch has committed, and the answer goes out once `release`
    exists. Then hold this batch, `marker` created, until the next job has arrived. The
    caller sends this with two `nothing()`, as `hold_then_die_answering_the_next_batch`."""
    process = sys.modules["__main__"]
    assert process.__file__ == sqlite_process.__file__
    answer = vars(process)["_write_all"]

    def held(fd: int, data: bytes) -> None:
        vars(process)["_write_all"] = answer  # the next batches are answered at once
        Path(committed).touch()
        while not Path(release).exists():
            select.select([], [], [], 0.02)  # the fault: wait for the test to say go
        answer(fd, data)

    vars(process)["_write_all"] = held  # this batch's answer is on its way already
    Path(marker).touch()
    select.select([0], [], [], 120)  # the jobs' pipe: until the next job is here
    return None
    yield  # a transaction's steps, with no statement
