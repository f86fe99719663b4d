"""`python -m tests.metering.replayer DATABASE_URL OUTBOX_DIR GO_FILE`: one process that
replays an outbox directory once. Ready, it creates GO_FILE.ready<pid>, then starts as
soon as GO_FILE exists (so two of them start together). Prints how many settlements it
wrote; exits 0 when the replay did not raise."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

from chatmeter.db.transactor import make_transactor
from chatmeter.metering.outbox import Outbox


async def main(database_url: str, directory: str, go: Path) -> int:
    transactor = make_transactor(database_url, 30_000)
    await transactor.start()
    try:
        await asyncio.to_thread(go.with_name(f"{go.name}.ready{os.getpid()}").touch)
        deadline = time.monotonic() + 60
        while not await asyncio.to_thread(go.exists):
            if time.monotonic() > deadline:
                return 2
            await asyncio.sleep(0.005)
        written = await Outbox(directory, f"replayer-{os.getpid()}").replay(transactor)
        print(written)
        return 0
    finally:
        await transactor.close()


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1], sys.argv[2], Path(sys.argv[3]))))
