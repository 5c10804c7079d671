"""PostgreSQL from Debian's packages, with logical decoding, in a cluster of our own.

The cluster is ours (not the Debian-managed one), so `down` and a fresh state directory never touch a
system database. Where it lives:

- Not root: the server runs as us, with its data in ``<state>/postgres/data`` (0700, like every folder of
  the state directory).
- Root: PostgreSQL refuses to run as root, so the server runs as the Debian package's ``postgres`` user.
  That user cannot enter a 0700 state directory (or a checkout inside a ``mktemp -d`` folder), and no
  permission is added to any parent folder for it; so the cluster lives under the postgres user's own home,
  ``~postgres/changeflow/<cluster id>/`` (data and socket, 0700, owned by postgres), and
  ``<state>/postgres/`` (root's, 0700) keeps the pid file, the cluster id and a ``data`` link to it. The id is
  random per state directory (a fresh state directory gets a fresh cluster); a cluster whose state
  directory is gone (or names another cluster) and that no server runs is removed on the next start. A
  cluster made by an earlier version inside the state directory is moved there on its next start.

Everything that may change between starts (port, listen address, socket folder, WAL limits) is passed on
the command line (``-c``), so an existing cluster gets it without a new initdb.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets as random
import shutil
import subprocess
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from changeflow.deploy.secrets import pg_superuser_password, replication_password
from changeflow.deploy.service import PRIVATE_MODE, Service, ServiceError, private_dir, secure_state

PG_MAJOR = "15"
SCHEMA_SQL = Path(__file__).parent / "sql" / "commerce.sql"
SERVER_USER = "postgres"  # when we are root
# The most WAL a replication slot may hold back (as docker-compose.yml): past it PostgreSQL invalidates the
# slot (wal_status 'lost', which `changeflow status` reports) instead of filling the disk.
MAX_SLOT_WAL_KEEP_SIZE = "4GB"


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

    # -- where the cluster lives ------------------------------------------------------------------
    def _run_as(self) -> str | None:
        return SERVER_USER if os.geteuid() == 0 else None

    def _server_user(self) -> pwd.struct_passwd:
        return pwd.getpwnam(SERVER_USER)

    def clusters_root(self) -> Path:
        """Root only: the folder, in the server user's own home, that holds changeflow's clusters."""
        return Path(self._server_user().pw_dir) / "changeflow"

    def cluster_id(self) -> str:
        path = self.home / "cluster-id"
        with contextlib.suppress(OSError):
            text = path.read_text().strip()
            if text:
                return text
        private_dir(self.home)
        value = random.token_hex(8)
        path.write_text(value + "\n")
        return value

    @property
    def cluster_dir(self) -> Path:
        """The cluster's own folder: data and socket (the state folder itself when we are not root)."""
        if self._run_as() is None:
            return self.home
        return self.clusters_root() / self.cluster_id()

    @property
    def data_dir(self) -> Path:
        return self.cluster_dir / "data"

    @property
    def socket_dir(self) -> Path:
        return self.cluster_dir

    def private_dirs(self) -> list[Path]:
        return [self.home, self.data_dir]

    def secure(self) -> None:
        if self._run_as() is None:
            super().secure()
            return
        # Root: the home is tightened; the cluster's folders belong to the server user and are made
        # private in prepare (initdb makes the data folder 0700 itself).
        private_dir(self.home)
        secure_state(self.settings)

    @property
    def url(self) -> str:
        s = self.settings
        return f"postgresql://{s.pg_superuser}@{s.pg_host}:{s.pg_port}/{s.pg_database}"

    def ports(self) -> list[int]:
        return [self.settings.pg_port]

    def install(self) -> None:
        if not (_bin_dir() / "postgres").exists():
            apt_install(f"postgresql-{PG_MAJOR}")

    def _as_server(self, path: Path, *, recursive: bool = False) -> None:
        """Hand ``path`` to the server user (root only)."""
        if self._run_as() is None:
            return
        entry = self._server_user()
        os.chown(path, entry.pw_uid, entry.pw_gid)
        if recursive:
            for root, dirs, files in os.walk(path):
                for name in dirs + files:
                    os.chown(os.path.join(root, name), entry.pw_uid, entry.pw_gid, follow_symlinks=False)

    def _server_private_dir(self, path: Path) -> None:
        """A 0700 folder owned by the server user (its parent is not changed)."""
        if not path.exists():
            path.mkdir(mode=PRIVATE_MODE)
        self._as_server(path)
        os.chmod(path, PRIVATE_MODE)

    def _prepare_cluster_dir(self) -> None:
        if self._run_as() is None:
            private_dir(self.home)
            return
        home = Path(self._server_user().pw_dir)
        if not home.is_dir():
            raise ServiceError(f"postgres: the {SERVER_USER} user's home {home} does not exist; reinstall "
                               f"postgresql-{PG_MAJOR} (it creates it)")
        self._server_private_dir(self.clusters_root())
        self._collect_orphans()
        self._server_private_dir(self.cluster_dir)
        (self.cluster_dir / "owner").write_text(str(self.settings.state) + "\n")
        self._as_server(self.cluster_dir / "owner")
        legacy = self.home / "data"
        if not legacy.is_symlink() and (legacy / "PG_VERSION").exists() and not (self.data_dir / "PG_VERSION").exists():
            # A cluster of the earlier layout (inside the state directory): moved, not re-created.
            if self.data_dir.exists():
                shutil.rmtree(self.data_dir)
            shutil.move(str(legacy), str(self.data_dir))
            self._as_server(self.data_dir, recursive=True)
        if legacy.is_symlink() or not legacy.exists():
            if legacy.is_symlink() and os.readlink(legacy) != str(self.data_dir):
                legacy.unlink()
            if not legacy.is_symlink():
                legacy.symlink_to(self.data_dir)  # where to look, for a human
        os.chown(self.home, os.geteuid(), os.getegid())  # the earlier layout handed it to the server user
        private_dir(self.home)

    def _collect_orphans(self) -> None:
        """Remove clusters whose state directory is gone or names another cluster, that no server runs."""
        for cluster in self.clusters_root().iterdir():
            if not cluster.is_dir() or cluster.name == self.cluster_id():
                continue
            try:
                owner = Path((cluster / "owner").read_text().strip())
            except OSError:
                continue  # not one of ours, or half made: left alone
            try:
                alive = (owner / "postgres" / "cluster-id").read_text().strip() == cluster.name
            except OSError:
                alive = False
            if alive or _server_running(cluster / "data"):
                continue
            shutil.rmtree(cluster, ignore_errors=True)

    def _write_hba(self) -> None:
        """Every role needs its password on TCP (scram), the superuser's included: no local process becomes
        superuser for free (and runs ``COPY ... TO PROGRAM``). The Unix socket stays trusted for the stack's
        own administration: its folder is 0700, the server user's (or yours) alone. Written at every start,
        so a cluster made by an earlier version gets it too."""
        hba = self.data_dir / "pg_hba.conf"
        hba.write_text(
            "local all all trust\n"
            "host all all 127.0.0.1/32 scram-sha-256\n"
            "host all all ::1/128 scram-sha-256\n"
            "host replication all 127.0.0.1/32 scram-sha-256\n"
            "host replication all ::1/128 scram-sha-256\n"
        )
        os.chmod(hba, 0o600)
        self._as_server(hba)

    def prepare(self) -> None:
        self._prepare_cluster_dir()
        pg_superuser_password(self.settings)  # generated before any client needs it
        if (self.data_dir / "PG_VERSION").exists():
            os.chmod(self.data_dir, PRIVATE_MODE)
            self._write_hba()
            return
        if self.data_dir.exists():
            shutil.rmtree(self.data_dir)
        cmd = [
            str(_bin_dir() / "initdb"),
            "-D", str(self.data_dir),
            "-U", self.settings.pg_superuser,
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "--encoding=UTF8",
            "--locale=C.UTF-8",
        ]
        # initdb creates the data folder 0700 itself, as the server user, inside the cluster folder.
        result = subprocess.run(cmd, capture_output=True, text=True, user=self._run_as(), cwd=self.cluster_dir)
        if result.returncode != 0:
            raise ServiceError(f"initdb failed:\n{result.stdout}\n{result.stderr}")
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write(
                "\n# changeflow: logical decoding for Debezium (pgoutput); the per-start settings (port,\n"
                "# listen address, socket folder, WAL limits) are on the command line (changeflow/deploy/postgres.py)\n"
                "wal_level = logical\n"
                "max_wal_senders = 10\n"
                "max_replication_slots = 10\n"
                "fsync = on\n"
                "shared_buffers = 256MB\n"
                "max_connections = 200\n"
            )
        self._as_server(self.data_dir, recursive=True)
        self._write_hba()

    def server_settings(self) -> dict[str, str]:
        """Given with ``-c`` at every start: they win over postgresql.conf, old clusters included."""
        s = self.settings
        return {
            "listen_addresses": "127.0.0.1",  # loopback only
            "port": str(s.pg_port),
            "unix_socket_directories": str(self.socket_dir),
            "unix_socket_permissions": "0700",
            "max_slot_wal_keep_size": MAX_SLOT_WAL_KEEP_SIZE,
        }

    def command(self) -> list[str]:
        flags = [arg for key, value in self.server_settings().items() for arg in ("-c", f"{key}={value}")]
        return [str(_bin_dir() / "postgres"), "-D", str(self.data_dir), *flags]

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
        """The stack's own administration: the superuser over the Unix socket (0700), no password needed."""
        s = self.settings
        return make_conninfo("", host=str(self.socket_dir), port=s.pg_port, user=s.pg_superuser, dbname=database)

    def after_start(self) -> None:
        s = self.settings
        with psycopg.connect(self._admin_dsn("postgres"), autocommit=True) as conn:
            # The password every TCP client of the superuser uses (Settings.pg_dsn); pg_hba.conf as written
            # at this start, for a server that was already running.
            conn.execute(sql.SQL("ALTER ROLE {} WITH PASSWORD {}").format(
                sql.Identifier(s.pg_superuser), sql.Literal(pg_superuser_password(s))))
            conn.execute("SELECT pg_reload_conf()")
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


def _server_running(data_dir: Path) -> bool:
    """A postmaster.pid naming a live process: a server runs on ``data_dir``."""
    try:
        pid = int((data_dir / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
