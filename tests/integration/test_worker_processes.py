"""The worker runs each sink in a process of its own: one command to start, to watch and to stop."""

from __future__ import annotations

import os
import signal

import httpx
import pytest

from changeflow.deploy.worker import WorkerService
from changeflow.settings import Settings
from tests.integration.conftest import eventually

pytestmark = pytest.mark.integration


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped) is gone for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_sink_processes_report_to_the_worker_and_die_with_it_even_on_sigkill(pipeline: Settings) -> None:
    extra = WorkerService(pipeline, instance=3)
    extra.start()
    try:
        extra.wait_healthy(120)

        def reported() -> dict[str, dict[str, object]]:
            states = httpx.get(f"{extra.url}/changeflow/sinks/", timeout=5).json()
            assert set(states) == {"redis", "search", "clickhouse"}
            assert all(isinstance(s["pid"], int) and s["pid"] != extra.pid() for s in states.values())
            return states

        states = eventually(reported, timeout=60, what="sink processes listed with their pids")
        sink_pids = [int(s["pid"]) for s in states.values()]  # type: ignore[call-overload]
        assert all(alive(pid) for pid in sink_pids)
        assert 'changeflow_sink_batch_size' in httpx.get(f"{extra.url}/metrics", timeout=5).text

        worker_pid = extra.pid()
        assert worker_pid is not None
        os.kill(worker_pid, signal.SIGKILL)  # the worker alone: no chance to stop its children itself
        eventually(lambda: not any(alive(pid) for pid in sink_pids), timeout=20,
                   what="sink processes gone with their worker")
    finally:
        extra.stop()


def listening_addresses(port: int) -> set[str]:
    """Local addresses listening on ``port`` (IPv4 and IPv6), read from /proc/net/tcp*."""
    found: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.rsplit(":", 1)
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(address)
    return found


def test_worker_web_port_listens_on_loopback_only(pipeline: Settings) -> None:
    """/metrics and the sink states carry no credentials: the worker binds the configured host only."""
    addresses = listening_addresses(pipeline.worker_web_port)
    assert addresses == {"0100007F"}, addresses  # 127.0.0.1, not 0.0.0.0 (00000000) or :: (all zeros)
