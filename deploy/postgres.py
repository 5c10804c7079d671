"""PostgreSQL from Debian's packages, with logical decoding, in a cluster of our own.

The cluster lives under ``<state>/postgres/data`` (not the Debian-managed cluster), so `down` and a
fresh state directory never touch a system database. PostgreSQL refuses to run as root, so when we
are root the server runs as the Debian package's ``postgres`` user.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from pathlib import Path

import psycopg
from psycopg import sql

from deploy.secrets import replication_password
from deploy.service import Service, ServiceError

PG_MAJOR = "15"
SCHEMA_SQL = Path(__file__).parent / "sql" / "commerce.sql"


def _bin_dir() -> Path:
    for major in (PG_MAJOR, "16", "17"):
        candidate = Path(f"/usr/lib/postgresql/{major}/bin")
        if (candidate / "postgres").exists():
            return candidate
    return Path(f"/usr/lib/postgresql/{PG_MAJOR}/bin")


def apt_install(*packages: str) -> None:
    """Install Debian packages; `apt-get update` first because a fresh machine has no lists."""
    prefix = [] if os.geteuid() == 0 else ["sudo", "-n"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    print(f"installing Debian packages: {' '.join(packages)}", flush=True)
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *packages]):
        result = subprocess.run(prefix + cmd, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise ServiceError(f"`{' '.join(cmd)}` failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")


class PostgresService(Service):
    name = "postgres"

    @property
    def url(self) -> str:
        s = self.settings
        return f"postgresql://{s.pg_superuser}@{s.pg_host}:{s.pg_port}/{s.pg_database}"

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    def ports(self) -> list[int]:
        return [self.settings.pg_port]

    def install(self) -> None:
        if not (_bin_dir() / "postgres").exists():
            apt_install(f"postgresql-{PG_MAJOR}")

    def _run_as(self) -> str | None:
        return "postgres" if os.geteuid() == 0 else None

    def _chown(self, path: Path) -> None:
        user = self._run_as()
        if user is None:
            return
        entry = pwd.getpwnam(user)
        for root, dirs, files in os.walk(path):
            os.chown(root, entry.pw_uid, entry.pw_gid)
            for name in dirs + files:
                os.chown(os.path.join(root, name), entry.pw_uid, entry.pw_gid)

    def prepare(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        if (self.data_dir / "PG_VERSION").exists():
            return
        if self.data_dir.exists():
            shutil.rmtree(self.data_dir)
        self.data_dir.mkdir(parents=True)
        self._chown(self.home)
        # The server user must be able to reach the data directory through every parent.
        for parent in self.home.parents:
            if parent == Path("/"):
                break
            mode = parent.stat().st_mode
            if not mode & 0o001:
                os.chmod(parent, mode | 0o001)
        cmd = [
            str(_bin_dir() / "initdb"),
            "-D", str(self.data_dir),
            "-U", self.settings.pg_superuser,
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "--encoding=UTF8",
            "--locale=C.UTF-8",
        ]
        result = subprocess.run(cmd, capture_output=True, text=True, user=self._run_as())
        if result.returncode != 0:
            raise ServiceError(f"initdb failed:\n{result.stdout}\n{result.stderr}")
        s = self.settings
        # Loopback only. The superuser is trusted on loopback for local development (psql without a
        # password, as the README promises); every other role, Debezium's included, needs its password.
        (self.data_dir / "pg_hba.conf").write_text(
            "local all all trust\n"
            f"host all {s.pg_superuser} 127.0.0.1/32 trust\n"
            f"host all {s.pg_superuser} ::1/128 trust\n"
            "host all all 127.0.0.1/32 scram-sha-256\n"
            "host all all ::1/128 scram-sha-256\n"
            "host replication all 127.0.0.1/32 scram-sha-256\n"
            "host replication all ::1/128 scram-sha-256\n"
        )
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write(
                "\n# changeflow: logical decoding for Debezium (pgoutput)\n"
                "wal_level = logical\n"
                "max_wal_senders = 10\n"
                "max_replication_slots = 10\n"
                "listen_addresses = '127.0.0.1'\n"
                f"port = {s.pg_port}\n"
                f"unix_socket_directories = '{self.home}'\n"
                "fsync = on\n"
                "shared_buffers = 256MB\n"
                "max_connections = 200\n"
            )
        self._chown(self.home)

    def command(self) -> list[str]:
        return [str(_bin_dir() / "postgres"), "-D", str(self.data_dir)]

    def env(self) -> dict[str, str]:
        return {k: v for k, v in os.environ.items() if not k.startswith("PG")}

    def spawn_user(self) -> str | None:
        return self._run_as()

    def healthy(self) -> bool:
        try:
            with psycopg.connect(self._admin_dsn("postgres"), connect_timeout=2) as conn:
                conn.execute("SELECT 1")
            return True
        except psycopg.Error:
            return False

    def _admin_dsn(self, database: str) -> str:
        s = self.settings
        return f"postgresql://{s.pg_superuser}@{s.pg_host}:{s.pg_port}/{database}"

    def after_start(self) -> None:
        s = self.settings
        with psycopg.connect(self._admin_dsn("postgres"), autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (s.pg_database,)).fetchone()
            if not exists:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(s.pg_database)))
        with psycopg.connect(self._admin_dsn(s.pg_database), autocommit=True) as conn:
            conn.execute(SCHEMA_SQL.read_text())  # type: ignore[arg-type,unused-ignore]
            conn.execute(
                sql.SQL("ALTER ROLE {} WITH LOGIN REPLICATION PASSWORD {}").format(
                    sql.Identifier(s.pg_replication_user),
                    sql.Literal(replication_password(s)),
                )
            )
