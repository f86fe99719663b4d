"""A throwaway PostgreSQL 15 server for one benchmark run, started the way the tests start
theirs (initdb + pg_ctl on a free loopback port, as the `postgres` user when root)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tools.bench.processes import free_port

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def postgres_available() -> bool:
    as_root_ok = os.geteuid() != 0 or shutil.which("runuser") is not None
    return (PG_BIN / "initdb").exists() and as_root_ok


class ThrowawayPostgres:
    """initdb, pg_ctl start on a free loopback port, and stop with the files removed.
    The tests start theirs with this too (`tests/support/postgres.py`)."""

    # fsync stays on; commits do not wait for the disk, which is what SQLite's WAL with
    # synchronous=NORMAL (chatmeter's setting) promises too; statements per exchange are
    # counted by the server itself
    options = (
        "-c synchronous_commit=off -c max_connections=300 "
        "-c shared_preload_libraries=pg_stat_statements"
    )

    def __init__(self) -> None:
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="chatmeter-pg-"))
        self.data = self.root / "data"
        self._as_root = os.geteuid() == 0

    def _run(self, *args: str) -> None:
        command = [str(PG_BIN / args[0]), *args[1:]]
        if self._as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        if self._as_root:
            shutil.chown(self.root, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 {self.options}"
        log = str(self.root / "log")
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", log, "-w", "start")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("PostgreSQL did not start")

    def stop(self) -> None:
        """Stop the server; its files are removed by a process of their own that nobody
        waits for: a test session's server holds a database per test, hundreds of
        thousands of files, and removing them under load took past the last test's
        timeout (2 minutes), failing a run whose every test passed."""
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        # the shell starts `rm` in the background and returns: `rm` goes on alone
        removal = 'rm -rf "$1" </dev/null >/dev/null 2>&1 &'
        subprocess.run(["sh", "-c", removal, "sh", str(self.root)], check=False, timeout=30)

    def createdb(self, name: str, template: str | None = None) -> None:
        command = [str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(self.port)]
        command += ["-U", "postgres", name, *(["-T", template] if template else [])]
        subprocess.run(command, check=True, capture_output=True, timeout=60)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{database}"
