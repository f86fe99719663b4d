"""The machine a run measured: what the report names, and how busy everything else was."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass

from tools.bench.processes import CLOCK_TICKS


@dataclass(frozen=True, slots=True)
class Machine:
    cpu_model: str
    cores: int
    memory_gib: float
    python: str
    system: str
    load_average: tuple[float, float, float]

    def describe(self) -> str:
        return (
            f"{self.cpu_model}, {self.cores} cores, {self.memory_gib:.1f} GiB RAM, "
            f"Python {self.python}, {self.system}"
        )


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _memory_gib() -> float:
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024**2
    return 0.0


def _distribution() -> str:
    try:
        with open("/etc/os-release") as handle:
            for line in handle:
                if line.startswith("PRETTY_NAME="):
                    return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return platform.system()


def this_machine() -> Machine:
    return Machine(
        cpu_model=_cpu_model(),
        cores=os.cpu_count() or 1,
        memory_gib=_memory_gib(),
        python=platform.python_version(),
        system=f"{_distribution()}, Linux {platform.release()}",
        load_average=os.getloadavg(),
    )


def busy_cpu_seconds() -> float:
    """CPU time the whole machine has spent not idle, over all cores, since boot.
    Compared with what the server and the client used, it shows what else ran."""
    with open("/proc/stat") as handle:
        fields = [int(v) for v in handle.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    # guest time is counted inside user time already
    return (sum(fields[:8]) - idle) / CLOCK_TICKS
