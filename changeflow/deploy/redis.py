"""Redis from Debian's packages, with its data and append-only file under the state directory (``<state>/redis/``,
0700 like every folder of the stack's state: changeflow/deploy/service.py)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from urllib.parse import quote

import redis
from pydantic_settings import BaseSettings

from changeflow.deploy.postgres import apt_install
from changeflow.deploy.secrets import redis_password
from changeflow.deploy.service import Service
from changeflow.settings import env_config


class RedisServerSettings(BaseSettings):
    """Where the stack's Redis listens: ``CHANGEFLOW_REDIS_HOST``, ``CHANGEFLOW_REDIS_PORT`` (the Redis store's
    connection settings read the same variables, changeflow/sinks/redis.py)."""

    model_config = env_config("CHANGEFLOW_REDIS_")

    host: str = "127.0.0.1"
    port: int = 6379


class RedisService(Service):
    name = "redis"

    @property
    def server(self) -> RedisServerSettings:
        return RedisServerSettings()

    @property
    def url(self) -> str:
        """Where it listens, as `stack status` shows it: never with the password."""
        return f"redis://{self.server.host}:{self.server.port}/0"

    def ports(self) -> list[int]:
        return [self.server.port]

    @staticmethod
    def _binary() -> str | None:
        return shutil.which("redis-server") or (
            "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
        )

    def install(self) -> None:
        if self._binary() is None:
            apt_install("redis-server")

    def prepare(self) -> None:
        s = self.server
        password = redis_password(self.settings)
        # appendonly: a derived store that survives a restart keeps its versioned tombstones. Protected mode
        # and a password: no local process writes files through CONFIG SET without the stack's secret. The
        # file holds the password, so it is the owner's alone (its folder is 0700 too).
        conf = self.home / "redis.conf"
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(
                f"bind {s.host}\n"
                f"port {s.port}\n"
                "protected-mode yes\n"
                f'requirepass "{password}"\n'
                "daemonize no\n"
                f"dir {self.home}\n"
                "appendonly yes\n"
                "appendfsync everysec\n"
                "save ''\n"
            )
        os.chmod(conf, 0o600)

    def command(self) -> list[str]:
        return [self._binary() or "redis-server", str(self.home / "redis.conf")]

    def healthy(self) -> bool:
        try:
            password = quote(redis_password(self.settings), safe="")
            url = f"redis://:{password}@{self.server.host}:{self.server.port}/0"
            return bool(redis.Redis.from_url(url, socket_timeout=1).ping())
        except redis.RedisError:
            return False
