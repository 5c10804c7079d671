"""Started as root, the server runs as a system user of its own that can reach only its own data folder.

As PostgreSQL does (``changeflow/deploy/postgres.py``): a gap in the guard must not read the stack's secrets,
the other services' data or anything else root can read. The user (``changeflow-ch``, created on first start
like the ``postgres`` user of the Debian package: system account, no login shell) owns its home
``/var/lib/changeflow-clickhouse`` (0700), where each data directory lives as ``<id>/data`` (0700), named by a
random id. The ``--data-dir`` the server is given becomes a link to it: no permission is added to any folder
above it (the state directory stays 0700 and root's). A data directory of an earlier version (a real folder
there) is moved into the home on its first start. A ``<id>`` whose link is gone (a purged state directory, a
test's temporary folder) and that no server has open is removed on the next start.

Everything the process imports is imported before the switch: this machine's interpreter lives under
``/root``, which the server user cannot read.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import os
import pwd
import secrets
import shutil
import subprocess
from pathlib import Path

SERVER_USER = "changeflow-ch"
SERVER_HOME = Path("/var/lib/changeflow-clickhouse")
# Imported lazily by the standard library or chdb; loaded while the interpreter's files can still be read.
PRELOAD = ("encodings.idna", "traceback", "linecache", "chdb", "chdb.state.sqlitelike")


def server_user() -> pwd.struct_passwd:
    """The server's system user, created when missing."""
    try:
        return pwd.getpwnam(SERVER_USER)
    except KeyError:
        pass
    cmd = ["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", str(SERVER_HOME),
           "--shell", "/usr/sbin/nologin", "--comment", "changeflow local ClickHouse server", SERVER_USER]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0 and "already exists" not in result.stderr:
        raise SystemExit(f"event=failed error='cannot create the system user {SERVER_USER}: {result.stderr.strip()}'")
    return pwd.getpwnam(SERVER_USER)


def _own(path: Path, entry: pwd.struct_passwd, recursive: bool = False) -> None:
    os.chown(path, entry.pw_uid, entry.pw_gid, follow_symlinks=False)
    if recursive:
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                os.chown(os.path.join(root, name), entry.pw_uid, entry.pw_gid, follow_symlinks=False)


def _private(path: Path, entry: pwd.struct_passwd) -> None:
    if not path.exists():
        path.mkdir(mode=0o700)
    _own(path, entry)
    os.chmod(path, 0o700)


def in_use(data: Path) -> bool:
    """The engine keeps ``status`` locked while it has the directory open."""
    try:
        fd = os.open(data / "status", os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def collect_orphans(keep: Path) -> None:
    """Remove data directories whose link no longer names them and that no server has open."""
    for cluster in SERVER_HOME.iterdir():
        if cluster == keep or not cluster.is_dir() or cluster.is_symlink():
            continue
        try:
            link = Path((cluster / "owner").read_text().strip())
        except OSError:
            continue  # not one of ours, or half made: left alone
        alive = link.is_symlink() and os.path.realpath(link) == str(cluster / "data")
        if not alive and not in_use(cluster / "data"):
            shutil.rmtree(cluster, ignore_errors=True)


def place_data_dir(data_dir: Path, entry: pwd.struct_passwd) -> Path:
    """The folder the engine opens, in the server user's home, with ``data_dir`` a link to it."""
    _private(SERVER_HOME, entry)
    data_dir = data_dir.absolute()
    target: Path | None = None
    if data_dir.is_symlink():
        resolved = Path(os.path.realpath(data_dir))
        if resolved.parent.parent == SERVER_HOME and resolved.name == "data":
            target = resolved
        else:
            raise SystemExit(f"event=failed error='{data_dir} links outside {SERVER_HOME}: refusing to use it'")
    cluster = target.parent if target is not None else SERVER_HOME / secrets.token_hex(8)
    _private(cluster, entry)
    data = cluster / "data"
    legacy = data_dir.is_dir() and not data_dir.is_symlink()
    if legacy and in_use(data_dir):
        raise SystemExit(f"event=failed data_dir={data_dir} error='another server has this data directory open'")
    if not data.exists():
        data.mkdir(mode=0o700)
    if legacy:  # an earlier version's data folder: moved, not re-created
        for child in data_dir.iterdir():
            shutil.move(str(child), str(data / child.name))
        data_dir.rmdir()
    _own(data, entry, recursive=legacy or data.stat().st_uid != entry.pw_uid)
    os.chmod(data, 0o700)
    (cluster / "owner").write_text(f"{data_dir}\n")
    os.chmod(cluster / "owner", 0o600)
    if not data_dir.is_symlink():
        data_dir.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        data_dir.symlink_to(data)
    collect_orphans(keep=cluster)
    return data


def drop_privileges(data_dir: Path) -> Path:
    """Root: become the server user (no supplementary groups, no way back); returns the folder to open.

    Not root: nothing changes, the server runs as its caller with ``data_dir`` as given.
    """
    if os.geteuid() != 0:
        return data_dir
    entry = server_user()
    data = place_data_dir(data_dir, entry)
    for module in PRELOAD:
        with contextlib.suppress(ImportError):
            importlib.import_module(module)
    os.chdir(data)
    os.setgroups([])
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)  # real, effective and saved: root is gone for good
    try:
        os.setuid(0)
    except PermissionError:
        return data
    raise SystemExit("event=failed error='still able to become root after dropping privileges'")
