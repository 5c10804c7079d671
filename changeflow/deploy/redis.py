"""Redis from Debian's packages, with its data and append-only file under the state directory (``<state>/redis/``,
0700 like every folder of the stack's state: changeflow/deploy/service.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import redis

from changeflow.deploy.postgres import apt_install
from changeflow.deploy.service import Service


class RedisService(Service):
    name = "redis"

    @property
    def url(self) -> str:
        return self.settings.redis_url

    def ports(self) -> list[int]:
        return [self.settings.redis_port]

    @staticmethod
    def _binary() -> str | None:
        return shutil.which("redis-server") or (
            "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
        )

    def install(self) -> None:
        if self._binary() is None:
            apt_install("redis-server")

    def prepare(self) -> None:
        s = self.settings
        # appendonly: a derived store that survives a restart keeps its versioned tombstones.
        (self.home / "redis.conf").write_text(
            f"bind {s.redis_host}\n"
            f"port {s.redis_port}\n"
            "protected-mode no\n"
            "daemonize no\n"
            f"dir {self.home}\n"
            "appendonly yes\n"
            "appendfsync everysec\n"
            "save ''\n"
        )

    def command(self) -> list[str]:
        return [self._binary() or "redis-server", str(self.home / "redis.conf")]

    def healthy(self) -> bool:
        try:
            return bool(redis.Redis.from_url(self.url, socket_timeout=1).ping())
        except redis.RedisError:
            return False
