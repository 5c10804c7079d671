"""ClickHouse for the local stack: the chdb engine behind ClickHouse's HTTP interface.

No ClickHouse server package installs here, but PyPI's ``chdb`` is the ClickHouse engine in-process
and only one process may open its data directory. ``deploy.clickhouse_server`` (a package) owns that directory
(``<state>/clickhouse/data``) and serves the HTTP interface on ``clickhouse_port``, so the sinks,
reports and tests use ``clickhouse-connect`` exactly as they would against a real server.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import httpx
from pydantic_settings import BaseSettings

from changeflow.deploy import secrets
from changeflow.deploy.service import Service, ServiceError, private_dir
from changeflow.settings import env_config

PROJECT_ROOT = Path(__file__).resolve().parents[2]


class ClickHouseServerSettings(BaseSettings):
    """Where the stack's ClickHouse server listens and for whom: ``CHANGEFLOW_CLICKHOUSE_*`` (the ClickHouse
    store's connection settings read the same variables, changeflow/sinks/clickhouse.py)."""

    model_config = env_config("CHANGEFLOW_CLICKHOUSE_")

    host: str = "127.0.0.1"
    port: int = 8123
    user: str = "default"
    # Created at the first start: the example pipeline's namespace.
    database: str = "changeflow"


class ClickHouseService(Service):
    name = "clickhouse"

    @property
    def server(self) -> ClickHouseServerSettings:
        return ClickHouseServerSettings()

    @property
    def url(self) -> str:
        return f"http://{self.server.host}:{self.server.port}"

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    def ports(self) -> list[int]:
        return [self.server.port]

    def private_dirs(self) -> list[Path]:
        # Started as root, the server runs as its own user with its data in that user's home, and the data
        # directory here is a link to it (clickhouse_server/privileges.py): that folder is the server's to keep.
        return [self.home] if self.data_dir.is_symlink() else [self.home, self.data_dir]

    def install(self) -> None:
        """chdb is a pip dependency of the project; check that its engine really loads."""
        if importlib.util.find_spec("chdb") is None:
            print("installing chdb from PyPI", flush=True)
            pip = subprocess.run(
                [sys.executable, "-m", "pip", "install", "-q", "chdb>=3.0"], capture_output=True, text=True
            )
            if pip.returncode != 0:
                raise ServiceError(f"clickhouse: `pip install chdb` failed:\n{pip.stderr[-2000:]}")
        # In a child process: importing chdb starts an engine, which the CLI process does not need.
        check = subprocess.run([sys.executable, "-c", "import chdb"], capture_output=True, text=True)
        if check.returncode != 0:
            raise ServiceError(f"clickhouse: chdb does not import:\n{check.stderr[-2000:]}")

    def prepare(self) -> None:
        """Nobody but us reads the warehouse: ``<state>/clickhouse`` and its data directory are 0700 (the data
        directory, when the server drops root, is its user's own 0700 folder behind a link)."""
        secrets.clickhouse_password(self.settings)  # generated before the server's first start
        for folder in self.private_dirs():
            private_dir(folder)

    def command(self) -> list[str]:
        s = self.server
        return [
            sys.executable,
            "-m",
            "changeflow.deploy.clickhouse_server",
            "--host",
            s.host,
            "--port",
            str(s.port),
            "--data-dir",
            str(self.data_dir),
            "--user",
            s.user,
        ]

    def env(self) -> dict[str, str]:
        env = super().env()
        # The process starts in its home directory; the server module lives in this checkout.
        env["PYTHONPATH"] = ":".join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p)
        # The password travels in the environment (as with the official image), never in argv.
        env["CLICKHOUSE_PASSWORD"] = secrets.clickhouse_password(self.settings)
        return env

    def _auth_headers(self) -> dict[str, str]:
        return {"X-ClickHouse-User": self.server.user, "X-ClickHouse-Key": secrets.clickhouse_password(self.settings)}

    def healthy(self) -> bool:
        try:
            ping = httpx.get(f"{self.url}/ping", timeout=2)
            if ping.status_code != 200 or ping.text != "Ok.\n":
                return False
            one = httpx.get(f"{self.url}/", params={"query": "SELECT 1"}, headers=self._auth_headers(), timeout=5)
            return one.status_code == 200 and one.text.strip() == "1"
        except httpx.HTTPError:
            return False

    def after_start(self) -> None:
        database = self.server.database.replace("\\", "\\\\").replace("`", "\\`")
        response = httpx.post(
            f"{self.url}/",
            content=f"CREATE DATABASE IF NOT EXISTS `{database}`",
            headers=self._auth_headers(),
            timeout=30,
        )
        if response.status_code != 200:
            raise ServiceError(f"clickhouse: creating database failed: {response.text.strip()}")
