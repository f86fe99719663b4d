"""Servers under test, each a process of its own, and what /proc says about them."""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def raise_open_files_limit(wanted: int = 65536) -> tuple[int, int]:
    """Raise this process's soft limit on open files (children inherit it): 2,000
    streams need 2,000 sockets on each side, past the usual 1,024. Returns (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft, hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target, hard


def _proc_status(pid: int, field: str) -> int:
    """A `kB` field of /proc/PID/status (VmRSS, VmHWM), in bytes."""
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (a chatmeter worker's SQLite writer, its local model)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    parent = int(handle.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue  # it ended meanwhile
            children.setdefault(parent, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo += children.get(current, [])
    return tree


def _tree_sum(pid: int, measure: Callable[[int], float]) -> float:
    total = 0.0
    for member in process_tree(pid):
        try:
            total += measure(member)
        except (OSError, KeyError):
            if member == pid:
                raise
    return total


@dataclass
class ServerProcess:
    """One server under test: a child process listening on `url`."""

    name: str
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    # the server and the processes it started (chatmeter's SQLite writer) count together

    def rss(self) -> int:
        return int(_tree_sum(self.pid, lambda pid: _proc_status(pid, "VmRSS")))

    def peak_rss(self) -> int:
        """The high-water marks of resident memory over the processes' lives, added up."""
        return int(_tree_sum(self.pid, lambda pid: _proc_status(pid, "VmHWM")))

    def cpu_seconds(self) -> float:
        return _tree_sum(self.pid, cpu_seconds)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_ready(self, path: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited at start:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + path, timeout=2) as answer:
                    if answer.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} was not ready in {timeout:.0f}s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=35)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_server(
    name: str,
    args: Sequence[str],
    *,
    port: int,
    env: dict[str, str],
    workdir: Path,
    ready_path: str,
) -> ServerProcess:
    """Start `python ARGS` with `env` and wait for `ready_path`. The caller's own
    CHATMETER_* settings are not passed on: every run measures the same configuration."""
    log_path = workdir / f"{name}.log"
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("CHATMETER_")}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, *args],
            env={**inherited, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    server = ServerProcess(name, f"http://127.0.0.1:{port}", process, log_path)
    try:
        server.wait_ready(ready_path)
    except BaseException:
        server.stop()
        raise
    return server
