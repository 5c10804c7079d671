"""CPU time per change: what decides throughput on a machine whose cores the stack's JVMs share.

Read from ``/proc/<pid>/stat`` (user + system time of every thread of the process, in clock ticks) before
and after a stage, for changeflow's own processes (the decode stage, each sink process) and the native
stack's (broker, Connect, search, ClickHouse, Redis, PostgreSQL). Wall-clock rates move with whatever else
the machine does; CPU seconds per change move much less, so runs on different days compare.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds ``pid`` has used so far; None when it is gone or unreadable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: the fields after its last ')' are fixed.
    fields = stat.rsplit(")", 1)[-1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS_PER_S  # utime, stime (fields 14 and 15 of stat)


class CpuMeter:
    """CPU seconds each named process used between ``start`` and ``stop``."""

    def __init__(self, pids: Mapping[str, int]) -> None:
        self.pids = dict(pids)
        self._start: dict[str, float] = {}

    def start(self) -> None:
        self._start = {name: s for name, pid in self.pids.items() if (s := cpu_seconds(pid)) is not None}

    def stop(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, begun in self._start.items():
            now = cpu_seconds(self.pids[name])
            if now is not None:
                out[name] = now - begun
        return out


def per_change_us(seconds: Mapping[str, float], changes: int, own: tuple[str, ...]) -> dict[str, float]:
    """µs of CPU per change per process, plus ``changeflow`` (the sum of ``own``: decode and sinks)."""
    if changes <= 0:
        return {}
    out = {name: round(s / changes * 1e6, 1) for name, s in sorted(seconds.items())}
    out["changeflow"] = round(sum(s for n, s in seconds.items() if n in own) / changes * 1e6, 1)
    return out
