"""Closed-loop load from `wrk`: N connections, each one client with its own chat and token.

Why wrk: on a 2-core machine the load generator must cost little next to the server it
drives, or the client becomes what is measured. wrk is C on epoll; it spends well under
a tenth of the server's CPU here (each result records both, so this stays checked).

Each wrk thread holds exactly one connection (`-t N -c N`), because wrk's Lua hooks know
the thread but not the connection: one thread = one client = one chat, so a connection
never finds its chat busy with another connection's reply (409). The Lua `response` hook
counts an exchange only when the stream answered 200 and ended with `"done":true`.

A spread staggers the clients' first requests evenly over that many seconds (wrk's `delay`
hook, which runs before every request: the first waits its share, the others none), so
that clients whose replies all take the same time do not stay in step."""

from __future__ import annotations

import json
import re
import resource
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tools.bench.machine import busy_cpu_seconds
from tools.bench.processes import ServerProcess

BENCH_MESSAGE = "Write one short sentence about measuring servers."

_SCRIPT = """
local slots = {%(slots)s}
local body = %(body)s
local threads = {}
local counter = 0

function setup(thread)
  counter = counter + 1
  thread:set("slot", counter)
  table.insert(threads, thread)
end

function init(args)
  local s = slots[slot]
  req = wrk.format("POST", s[1], {
    ["Authorization"] = "Bearer " .. s[2],
    ["Content-Type"] = "application/json",
  }, body)
  ended = 0
  failed = 0
end

function request()
  return req
end

function response(status, headers, body)
  if status == 200 and string.find(body, '"done":true', 1, true) then
    ended = ended + 1
  else
    failed = failed + 1
  end
end

%(spread)s
function done(summary, latency, requests)
  local e, f = 0, 0
  for _, t in ipairs(threads) do
    e = e + t:get("ended")
    f = f + t:get("failed")
  end
  local err = summary.errors
  io.write(string.format(
    'BENCH_JSON {"duration_us": %%d, "responses": %%d, "ended": %%d, "failed": %%d, ' ..
    '"socket_errors": %%d, "p50": %%d, "p90": %%d, "p99": %%d, "mean": %%f, "max": %%d}\\n',
    summary.duration, summary.requests, e, f,
    err.connect + err.read + err.write + err.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.mean, latency.max))
end
"""


@dataclass(frozen=True, slots=True)
class Slot:
    """One client: its chat, the path it posts to and the token it sends."""

    chat_id: str
    path: str
    token: str


@dataclass(frozen=True, slots=True)
class LoadResult:
    concurrency: int
    seconds: float
    exchanges: int  # answered 200 and ended with the end event
    failures: int  # any other answer
    socket_errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    client_cpu_seconds: float
    server_cpu_seconds: float
    other_cpu_seconds: float  # everything else the machine ran meanwhile

    @property
    def throughput(self) -> float:
        return self.exchanges / self.seconds

    @property
    def server_cpu_ms_per_exchange(self) -> float:
        return self.server_cpu_seconds * 1000 / self.exchanges if self.exchanges else 0.0

    @property
    def server_cpu_share(self) -> float:
        """Cores' worth of CPU the server used (1.0: one core, all the time)."""
        return self.server_cpu_seconds / self.seconds

    @property
    def errors(self) -> int:
        return self.failures + self.socket_errors


def wrk_path() -> str:
    path = shutil.which("wrk")
    if path is None:
        raise RuntimeError("wrk is not installed: apt-get install -y wrk (make bench does)")
    return path


def _lua_string(text: str) -> str:
    if not text.isascii():
        raise ValueError("the wrk script takes ASCII strings only")
    return json.dumps(text)  # a JSON string of ASCII is a valid Lua string literal


# the first request of thread `slot` (1..N) waits its share of the spread; wrk times a
# request from when it is written, so the wait is not in its latency
_SPREAD = """
local started = false

function delay()
  if started then
    return 0
  end
  started = true
  return math.floor(%(spread_ms)d * (slot - 1) / #slots)
end
"""


def write_script(path: Path, slots: list[Slot], message: str, spread_seconds: float = 0.0) -> None:
    rows = ",".join(f"{{{_lua_string(s.path)},{_lua_string(s.token)}}}" for s in slots)
    body = _lua_string(json.dumps({"message": message}))
    spread = _SPREAD % {"spread_ms": round(spread_seconds * 1000)} if spread_seconds > 0 else ""
    path.write_text(_SCRIPT % {"slots": rows, "body": body, "spread": spread})


def run_wrk(
    server: ServerProcess,
    slots: list[Slot],
    *,
    seconds: float,
    workdir: Path,
    message: str = BENCH_MESSAGE,
    spread_seconds: float = 0.0,
) -> LoadResult:
    """`len(slots)` concurrent clients, each posting an exchange as soon as its last one
    ended, for `seconds`; their first requests spread over `spread_seconds`."""
    concurrency = len(slots)
    script = workdir / f"wrk-{server.name}-{concurrency}.lua"
    write_script(script, slots, message, spread_seconds)
    command = [
        wrk_path(),
        f"-t{concurrency}",
        f"-c{concurrency}",
        f"-d{seconds:g}s",
        "--timeout",
        "30s",
        "-s",
        str(script),
        server.url + "/",
    ]
    server_cpu, busy = server.cpu_seconds(), busy_cpu_seconds()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    server_cpu, busy = server.cpu_seconds() - server_cpu, busy_cpu_seconds() - busy
    match = re.search(r"^BENCH_JSON (.*)$", done.stdout, re.MULTILINE)
    if done.returncode != 0 or match is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout}\n{done.stderr}")
    data = json.loads(match.group(1))
    client_cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return LoadResult(
        concurrency=concurrency,
        seconds=data["duration_us"] / 1e6,
        exchanges=data["ended"],
        failures=data["failed"],
        socket_errors=data["socket_errors"],
        p50_ms=data["p50"] / 1000,
        p90_ms=data["p90"] / 1000,
        p99_ms=data["p99"] / 1000,
        mean_ms=data["mean"] / 1000,
        max_ms=data["max"] / 1000,
        client_cpu_seconds=client_cpu,
        server_cpu_seconds=server_cpu,
        other_cpu_seconds=max(0.0, busy - server_cpu - client_cpu),
    )
