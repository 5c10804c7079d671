"""Started as root, the local ClickHouse server runs as a system user of its own (#20 §1).

A gap in the guard must not read what root can: the stack's secrets, PostgreSQL's data, other folders of
the state directory. Each test starts servers of its own on free ports (never the shared stack's), checks
the running process's credentials in ``/proc``, and checks what that user can read with ``cat`` run as it.
"""

from __future__ import annotations

import os
import pwd
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("chdb")

from changeflow.deploy.clickhouse import ClickHouseService
from changeflow.deploy.clickhouse_server.privileges import SERVER_HOME, SERVER_USER
from changeflow.settings import Settings
from tests.integration.test_clickhouse_http import ServerProcess, free_port

pytestmark = pytest.mark.integration
ROOT = os.geteuid() == 0


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    with ServerProcess(state / "data", tmp_path / "server.log").running() as srv:
        yield srv


def credentials(pid: int) -> dict[str, list[str]]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.split() for k, _, v in (line.partition(":") for line in lines) if k in ("Uid", "Gid", "Groups")}


def readable_by(uid: int, gid: int, path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["cat", str(path)], user=uid, group=gid, extra_groups=[], capture_output=True, text=True,
                          timeout=30)  # fmt: skip


def test_the_server_runs_as_its_own_user_without_groups(server: ServerProcess) -> None:
    assert server.proc is not None
    creds = credentials(server.proc.pid)
    if not ROOT:  # started by an ordinary user: it stays that user
        assert creds["Uid"] == [str(os.getuid())] * 4
        return
    entry = pwd.getpwnam(SERVER_USER)
    assert creds["Uid"] == [str(entry.pw_uid)] * 4  # real, effective, saved, filesystem
    assert creds["Gid"] == [str(entry.pw_gid)] * 4
    assert creds["Groups"] == []
    assert entry.pw_shell == "/usr/sbin/nologin" and entry.pw_uid != 0
    assert server.http.post(f"{server.url}/", content="SELECT 1").text == "1\n"


def test_the_server_user_cannot_read_secrets_or_other_services_data(server: ServerProcess, tmp_path: Path) -> None:
    if not ROOT:  # the switch of user happens only when the server is started as root
        assert not server.data_dir.is_symlink()
        return
    entry = pwd.getpwnam(SERVER_USER)
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir(mode=0o700)
    (secrets_dir / "pg_superuser_password").write_text("s3cret\n")
    targets = [secrets_dir / "pg_superuser_password", Path("/etc/shadow")]
    stack = Settings().state  # the shared stack's state directory, when this machine has one
    targets += sorted((stack / "secrets").glob("*")) if (stack / "secrets").is_dir() else []
    pg_data = stack / "postgres" / "data"
    if (pg_data / "PG_VERSION").exists():
        targets.append(pg_data / "PG_VERSION")
    for path in targets:
        assert path.exists(), path  # root reads it...
        result = readable_by(entry.pw_uid, entry.pw_gid, path)
        assert result.returncode != 0 and "Permission denied" in result.stderr, path  # ...the server's user not
        assert result.stdout == ""
    # Its own data folder is its own, behind a link; the folder holding the link is untouched (0700, root's).
    link = server.data_dir
    assert link.is_symlink()
    data = Path(os.path.realpath(link))
    assert data.parent.parent == SERVER_HOME and data.name == "data"
    assert data.stat().st_uid == entry.pw_uid and stat.S_IMODE(data.stat().st_mode) == 0o700
    assert link.parent.stat().st_uid == 0 and stat.S_IMODE(link.parent.stat().st_mode) == 0o700
    assert readable_by(entry.pw_uid, entry.pw_gid, data / "status").returncode == 0


def test_an_earlier_data_folder_is_moved_and_an_orphan_removed(tmp_path: Path) -> None:
    """Root: a data folder an earlier version made (a real folder, root's) keeps its tables; a data folder whose
    link is gone (a purged state directory) is removed on the next start."""
    if not ROOT:
        return
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    legacy = state / "data"
    made = subprocess.run(
        [sys.executable, "-c", "import sys; from chdb.state import sqlitelike; c = sqlitelike.connect(sys.argv[1]); "
         "c._conn.query('CREATE TABLE old (k UInt8) ENGINE = MergeTree ORDER BY k', 'TSV'); "
         "c._conn.query('INSERT INTO old VALUES (1), (2), (3)', 'TSV'); c.close()", str(legacy)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr[-2000:]
    assert legacy.is_dir() and not legacy.is_symlink() and legacy.stat().st_uid == 0
    srv = ServerProcess(legacy, tmp_path / "server.log")
    srv.start()
    try:
        assert srv.http.post(f"{srv.url}/", content="SELECT sum(k) FROM old").text == "6\n"
        assert srv.http.post(f"{srv.url}/", content="INSERT INTO old VALUES (4)").status_code == 200
    finally:
        srv.stop()
    assert legacy.is_symlink()
    cluster = Path(os.path.realpath(legacy)).parent
    assert (cluster / "data" / "store").is_dir()  # the tables moved with it
    legacy.unlink()  # the state directory is purged: its data folder is an orphan now
    (tmp_path / "other").mkdir(mode=0o700)
    other = ServerProcess(tmp_path / "other" / "data", tmp_path / "other.log")
    other.start()
    try:
        assert not cluster.exists()
    finally:
        other.stop()


def test_the_stacks_service_starts_reports_and_stops_the_server(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # The server's port is the stack's ClickHouse settings' (CHANGEFLOW_CLICKHOUSE_PORT), not the core settings'.
    monkeypatch.setenv("CHANGEFLOW_CLICKHOUSE_PORT", str(free_port()))
    settings = Settings(state_dir=tmp_path / "state")
    service = ClickHouseService(settings)
    service.start()
    try:
        service.wait_healthy(90)
        status = service.status()
        assert status.running and status.healthy and status.pid is not None
        if ROOT:
            assert credentials(status.pid)["Uid"] == [str(pwd.getpwnam(SERVER_USER).pw_uid)] * 4
            assert service.data_dir.is_symlink()
        service.after_start()  # creates the stack's database through the server
        service.secure()  # a later `stack up` tightens the state folders: the link's target is left alone
    finally:
        assert service.stop() is True
    assert not service.running()
    assert not service.status().healthy
    service.start()  # and again, over the same data
    try:
        service.wait_healthy(90)
    finally:
        service.stop()
