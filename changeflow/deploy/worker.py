"""The changeflow worker run in the background (for the demo and the tests), like a stack service; and the
worker `stack status` shows, whoever started it: any worker answering on the web port."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import httpx

from changeflow.deploy.service import Service, ServiceStatus
from changeflow.settings import Settings


def listening_pid(port: int) -> int | None:
    """The process listening on TCP ``port`` on this host, from /proc (None where it cannot be told)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(fields[9])
    if not inodes:
        return None
    wanted = {f"socket:[{inode}]" for inode in inodes}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (entry / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in wanted:
                        return int(entry.name)
    return None


class WorkerService(Service):
    """``instance`` > 1 runs another worker of the same consumer groups (scale-out), with its own pid,
    log and web port (the configured port + instance - 1)."""

    name = "worker"

    def __init__(self, settings: Settings, instance: int = 1) -> None:
        if instance > 1:
            settings = settings.model_copy(update={"worker_web_port": settings.worker_web_port + instance - 1})
            self.name = f"worker-{instance}"
        super().__init__(settings)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.settings.worker_web_port}"

    def ports(self) -> list[int]:
        return [self.settings.worker_web_port]

    def install(self) -> None:
        """Installed with the project itself (pip install -e .)."""

    def command(self) -> list[str]:
        return [sys.executable, "-m", "changeflow", "worker"]

    def env(self) -> dict[str, str]:
        env = super().env()
        env["CHANGEFLOW_STATE_DIR"] = str(self.settings.state)
        env["CHANGEFLOW_WORKER_WEB_PORT"] = str(self.settings.worker_web_port)
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def healthy(self) -> bool:
        try:
            return httpx.get(self.url + "/", timeout=2).status_code < 500
        except httpx.HTTPError:
            return False

    def status(self) -> ServiceStatus:
        """Ours (pid file) or not: a worker answering on the web port is shown, with its pid when /proc says."""
        own = self.pid()
        answering = self.healthy()
        pid = own if own is not None else (listening_pid(self.settings.worker_web_port) if answering else None)
        detail = "" if own is not None or not answering else "not started by changeflow (a foreground worker)"
        return ServiceStatus(self.name, self.url, own is not None or answering, answering, pid,
                             str(self.log_file) if own is not None else "-", detail)

    def stop_hint(self) -> str:
        """How to stop the worker that runs now (for refusals that need it stopped)."""
        st = self.status()
        if self.pid() is not None:
            return "`changeflow stack down worker`"
        if st.pid is not None:
            return f"Ctrl-C in its terminal, or `kill {st.pid}` (the worker answering on port " \
                   f"{self.settings.worker_web_port})"
        return "Ctrl-C in the terminal of each `changeflow worker` of this pipeline (on any host)"
