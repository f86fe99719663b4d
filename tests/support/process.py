"""`chatmeter serve` as a real subprocess (several workers), configured by env + TOML."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.support.postgres import free_port

BIN = Path(sys.executable).parent


@contextmanager
def chatmeter_process(
    database_url: str,
    secret: str,
    toml: str,
    tmp_path: Path,
    *,
    workers: int = 2,
    extra_env: dict[str, str] | None = None,
) -> Iterator[str]:
    config = tmp_path / "chatmeter.toml"
    config.write_text(toml)
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CHATMETER_")},
        "CHATMETER_DATABASE_URL": database_url,
        "CHATMETER_JWT_SECRET": secret,
        "CHATMETER_CONFIG": str(config),
        "CHATMETER_OUTBOX_DIR": str(tmp_path / "outbox"),
        **(extra_env or {}),
    }
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [str(BIN / "chatmeter"), "serve", "--port", str(port), "--workers", str(workers)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((tmp_path / "server.log").read_text()[-3000:])
            time.sleep(0.1)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()
