"""The changeflow worker run in the background (for the demo and the tests), like a stack service."""

from __future__ import annotations

import sys

import httpx

from changeflow.settings import Settings
from deploy.service import Service


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
