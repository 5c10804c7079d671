"""The shape every service of the native local stack shares.

A service installs itself from a registry (idempotently), starts as a detached process whose pid,
log and data live under ``<state_dir>/<name>/``, reports health by really talking to its port, and
stops only the process it started (identified by its pid file).

Least exposure: every folder the stack creates under the state directory is 0700 (``private_dir``), and
no permission is ever added to a folder above it; a service whose process runs as another OS user keeps
that user's data where that user can already reach it (``changeflow/deploy/postgres.py``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from changeflow.settings import Settings
from changeflow.waiting import WaitTimeout, wait_until


class ServiceError(RuntimeError):
    """A service failed to install or start; the message names it and quotes its log."""


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    url: str
    running: bool
    healthy: bool
    pid: int | None
    log: str
    detail: str = ""


PRIVATE_MODE = 0o700
# Folders of the state directory that no service owns but that hold data or secrets: made private too.
SHARED_PRIVATE_DIRS = ("secrets", "worker-data", "logs", "fatal")


def private_dir(path: Path) -> Path:
    """``path`` as a folder only its owner can enter (0700), created if missing.

    Missing ancestors are created 0700 as well; an existing ancestor is never touched (no permission is
    added to a parent). An existing ``path`` is tightened to 0700 whatever it was.
    """
    missing: list[Path] = []
    current = path
    while not current.exists():
        missing.append(current)
        current = current.parent
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another process made it first: tightened below
            folder.mkdir(mode=PRIVATE_MODE)
        os.chmod(folder, PRIVATE_MODE)  # mkdir's mode goes through the umask
    if path.stat().st_mode & 0o777 != PRIVATE_MODE:
        os.chmod(path, PRIVATE_MODE)
    return path


def secure_state(settings: Settings) -> None:
    """Tighten the state directory's shared folders that already exist (a stack made before they were
    private becomes private on the next `stack up`, without a restart)."""
    for name in SHARED_PRIVATE_DIRS:
        folder = settings.state / name
        if folder.is_dir():
            private_dir(folder)


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def tail(path: Path, lines: int = 30) -> str:
    if not path.exists():
        return f"(no log at {path})"
    with path.open("rb") as fh:
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        fh.seek(max(0, size - 64_000))
        data = fh.read().decode("utf-8", "replace")
    return "\n".join(data.splitlines()[-lines:])


class Service(ABC):
    name: str = ""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    # -- locations -------------------------------------------------------------------------------
    @property
    def home(self) -> Path:
        return self.settings.state / self.name

    @property
    def pid_file(self) -> Path:
        return self.home / "pid"

    @property
    def log_file(self) -> Path:
        return self.settings.state / "logs" / f"{self.name}.log"

    # -- to implement ----------------------------------------------------------------------------
    @property
    @abstractmethod
    def url(self) -> str: ...

    @abstractmethod
    def install(self) -> None:
        """Fetch binaries from the registries this machine reaches; a no-op when already there."""

    @abstractmethod
    def command(self) -> list[str]:
        """The foreground command that runs the service (it is detached by ``start``)."""

    @abstractmethod
    def healthy(self) -> bool:
        """True only when the service answers its protocol on its port."""

    def private_dirs(self) -> list[Path]:
        """The folders of this service that only its owner may enter: its home, and its data folders
        (an existing one is tightened on every `stack up`, running or not)."""
        return [self.home]

    def secure(self) -> None:
        for folder in self.private_dirs():
            if folder == self.home or folder.exists():
                private_dir(folder)
        secure_state(self.settings)

    def prepare(self) -> None:  # noqa: B027 - optional hook
        """One-time initialisation of the data directory before the first start."""

    def after_start(self) -> None:  # noqa: B027 - optional hook
        """Work that needs the running service (create roles, topics, databases...)."""

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def spawn_user(self) -> str | None:
        """The OS user the process runs as (None: ours); PostgreSQL refuses to run as root."""
        return None

    # -- shared behaviour ------------------------------------------------------------------------
    def pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return pid
        # A zombie (exited child not yet reaped) counts as not running.
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{pid}/stat").read_text()
            if stat.rsplit(")", 1)[1].split()[0] == "Z":
                return None
        return pid

    def running(self) -> bool:
        return self.pid() is not None

    def start(self) -> None:
        """Start detached unless our own process already runs; a foreign listener is an error."""
        if self.running():
            return
        if self.ports_in_use():
            raise ServiceError(
                f"{self.name}: port(s) {self.ports_in_use()} already in use by a process changeflow did "
                f"not start; stop it or configure another port (see changeflow/settings.py)"
            )
        private_dir(self.home)
        private_dir(self.log_file.parent)
        self.prepare()
        self.secure()
        log = self.log_file.open("ab")
        proc = subprocess.Popen(
            self.command(),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.home,
            env=self.env(),
            start_new_session=True,
            user=self.spawn_user(),
            group=self.spawn_user(),
            extra_groups=[] if self.spawn_user() else None,
        )
        self.pid_file.write_text(str(proc.pid))

    def ports(self) -> list[int]:
        return []

    def ports_in_use(self) -> list[int]:
        return [p for p in self.ports() if port_open("127.0.0.1", p)]

    def wait_healthy(self, timeout: float) -> None:
        # `stack up` waits for every service, started now or long running: its folders are tightened here.
        if self.home.exists():
            self.secure()
        def healthy() -> bool:
            if self.healthy():
                return True
            if not self.running():
                raise ServiceError(
                    f"{self.name} exited during start; last lines of {self.log_file}:\n{tail(self.log_file)}"
                )
            return False

        wait_until(healthy, timeout, what=f"{self.name} healthy", error=lambda _: ServiceError(
            f"{self.name} not healthy after {timeout:.0f}s; last lines of {self.log_file}:\n{tail(self.log_file)}"))

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop the process group we started; returns False when nothing of ours was running."""
        pid = self.pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        with contextlib.suppress(WaitTimeout):  # then it is killed
            wait_until(lambda: self.pid() is None, timeout, what=f"{self.name} stopped", interval=0.2)
        if self.pid() is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            time.sleep(0.5)
        self.pid_file.unlink(missing_ok=True)
        return True

    def status(self) -> ServiceStatus:
        pid = self.pid()
        healthy = self.healthy() if pid is not None else False
        return ServiceStatus(self.name, self.url, pid is not None, healthy, pid, str(self.log_file))
