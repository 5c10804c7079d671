"""The native stack's generated configuration, as pure functions: what each server is told at start.

Least exposure (issue 11, section 4): Kafka Connect resolves only the secrets it is meant to, every state
folder is 0700 with no permission added to a parent, PostgreSQL bounds the WAL a slot may hold, `status`
says when changes were lost, and a second worker stops on a taken web port before anything starts.
"""

from __future__ import annotations

import os
import pwd
import re
import socket
import stat
from pathlib import Path

import pytest

from changeflow.connectors.render import connect_secret
from changeflow.deploy import postgres as pg_module
from changeflow.deploy.clickhouse import ClickHouseService
from changeflow.deploy.connect import ConnectService
from changeflow.deploy.jvm import properties
from changeflow.deploy.kafka import KafkaService
from changeflow.deploy.postgres import MAX_SLOT_WAL_KEEP_SIZE, PostgresService
from changeflow.deploy.redis import RedisService
from changeflow.deploy.search_engine import SearchEngineService
from changeflow.deploy.service import private_dir, secure_state
from changeflow.reports.status import RetentionGap, SlotStatus, retention_warning, slot_warning
from changeflow.settings import Settings
from changeflow.worker import web_port_taken


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(state_dir=tmp_path / "state", pg_port=25432, connect_port=28083)


# --- Kafka Connect ---------------------------------------------------------------------------------


def test_connect_worker_resolves_env_only_for_changeflow_variables(settings: Settings) -> None:
    props = ConnectService(settings).worker_properties()
    assert props["config.providers"] == "env,file,dir"
    assert props["config.providers.env.class"] == "org.apache.kafka.common.config.provider.EnvVarConfigProvider"
    pattern = str(props["config.providers.env.param.allowlist.pattern"])
    assert pattern == "CHANGEFLOW_.*"
    # Java's Matcher.matches(): the whole name.
    assert re.fullmatch(pattern, "CHANGEFLOW_PG_REPLICATION_PASSWORD")
    for outside in ("PATH", "HOME", "AWS_SECRET_ACCESS_KEY", "XCHANGEFLOW_A", "changeflow_x"):
        assert not re.fullmatch(pattern, outside), outside


def test_connect_file_and_dir_providers_read_only_the_secrets_folder(settings: Settings) -> None:
    props = ConnectService(settings).worker_properties()
    secrets = settings.state / "secrets"
    assert props["config.providers.file.class"] == "org.apache.kafka.common.config.provider.FileConfigProvider"
    assert props["config.providers.dir.class"] == "org.apache.kafka.common.config.provider.DirectoryConfigProvider"
    assert str(props["config.providers.file.param.allowed.paths"]) == str(secrets)
    assert str(props["config.providers.dir.param.allowed.paths"]) == str(secrets)
    assert props["connector.client.config.override.policy"] == "None"
    text = properties(props)
    assert f"config.providers.dir.param.allowed.paths={secrets}\n" in text
    assert "config.providers.env.param.allowlist.pattern=CHANGEFLOW_.*\n" in text
    assert "connector.client.config.override.policy=None\n" in text
    assert "override.policy=All" not in text


def test_a_pipeline_file_secret_renders_to_the_provider_the_worker_has(settings: Settings) -> None:
    """changeflow/connectors/render.py turns `${file:/dir/name}` into `${dir:/dir:name}`: the worker has that provider,
    and a secret kept in the state's secrets folder is inside its allowed path."""
    props = ConnectService(settings).worker_properties()
    secret = settings.state / "secrets" / "shop_pg_password"
    rendered = connect_secret(f"${{file:{secret}}}", "sources.postgres.password")
    match = re.fullmatch(r"\$\{(\w+):([^:}]+):([^}]+)\}", rendered)
    assert match is not None, rendered
    provider, folder, key = match.groups()
    assert provider in str(props["config.providers"]).split(",")
    assert folder == str(props[f"config.providers.{provider}.param.allowed.paths"]) and key == secret.name
    env_ref = "${env:CHANGEFLOW_PG_REPLICATION_PASSWORD}"
    assert connect_secret(env_ref, "x") == env_ref


def test_connect_environment_names_only_allowed_variables_for_connectors(settings: Settings) -> None:
    env = ConnectService(settings).env()
    pattern = str(ConnectService(settings).worker_properties()["config.providers.env.param.allowlist.pattern"])
    for name in ("CHANGEFLOW_PG_REPLICATION_PASSWORD", "CHANGEFLOW_PG_HOST", "CHANGEFLOW_PG_PORT"):
        assert env[name] and re.fullmatch(pattern, name)
    assert mode(settings.state / "secrets") == 0o700  # made by the password's generation


# --- state folders ---------------------------------------------------------------------------------


def test_private_dir_creates_missing_folders_0700_and_never_touches_an_existing_parent(tmp_path: Path) -> None:
    parent = tmp_path / "checkout"
    parent.mkdir(mode=0o755)
    os.chmod(parent, 0o700)  # as in a `mktemp -d` folder
    before = mode(parent)
    target = private_dir(parent / "state" / "postgres" / "data")
    assert mode(target) == mode(target.parent) == mode(target.parent.parent) == 0o700
    assert mode(parent) == before == 0o700
    os.chmod(parent, 0o750)
    private_dir(parent / "state")
    assert mode(parent) == 0o750  # an existing parent keeps its mode


def test_private_dir_tightens_an_existing_folder(tmp_path: Path) -> None:
    folder = tmp_path / "redis"
    folder.mkdir()
    os.chmod(folder, 0o755)
    private_dir(folder)
    assert mode(folder) == 0o700


def test_secure_state_tightens_the_shared_folders(settings: Settings) -> None:
    for name in ("secrets", "worker-data", "logs", "fatal"):
        (settings.state / name).mkdir(parents=True)
        os.chmod(settings.state / name, 0o755)
    secure_state(settings)
    for name in ("secrets", "worker-data", "logs", "fatal"):
        assert mode(settings.state / name) == 0o700, name


@pytest.mark.parametrize("service", [RedisService, KafkaService, SearchEngineService, ClickHouseService,
                                     ConnectService])
def test_every_service_home_and_data_folder_is_private(settings: Settings, service: type) -> None:
    svc = service(settings)
    for folder in svc.private_dirs():
        folder.mkdir(parents=True, exist_ok=True)
        os.chmod(folder, 0o755)
    svc.secure()
    assert svc.home in svc.private_dirs()
    for folder in svc.private_dirs():
        assert mode(folder) == 0o700, folder


def test_redis_config_is_loopback_with_its_data_in_its_private_home(settings: Settings) -> None:
    svc = RedisService(settings)
    private_dir(svc.home)
    svc.prepare()
    conf = (svc.home / "redis.conf").read_text()
    assert f"bind {svc.server.host}\n" in conf and f"dir {svc.home}\n" in conf
    assert mode(svc.home) == 0o700


def test_search_prepare_makes_its_data_logs_and_tmp_private(settings: Settings) -> None:
    svc = SearchEngineService(settings)
    private_dir(svc.home)
    svc.prepare()
    for name in ("data", "logs", "tmp"):
        assert mode(svc.home / name) == 0o700, name


# --- PostgreSQL ------------------------------------------------------------------------------------


def test_postgres_command_bounds_slot_wal_and_listens_on_loopback(settings: Settings,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(PostgresService, "_run_as", lambda self: None)
    svc = PostgresService(settings)
    cmd = svc.command()
    flags = dict(cmd[i + 1].split("=", 1) for i, arg in enumerate(cmd) if arg == "-c")
    assert cmd[cmd.index("-D") + 1] == str(svc.data_dir)
    assert flags["max_slot_wal_keep_size"] == MAX_SLOT_WAL_KEEP_SIZE == "4GB"
    assert flags["port"] == "25432" and flags["listen_addresses"] == "127.0.0.1"
    assert flags["unix_socket_directories"] == str(svc.home) and flags["unix_socket_permissions"] == "0700"


def test_postgres_slot_wal_bound_matches_compose() -> None:
    compose = (Path(__file__).resolve().parents[2] / "docker-compose.yml").read_text()
    assert f"max_slot_wal_keep_size={MAX_SLOT_WAL_KEEP_SIZE}" in compose


def test_postgres_as_ourselves_keeps_its_data_in_the_state_folder(settings: Settings,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(PostgresService, "_run_as", lambda self: None)
    svc = PostgresService(settings)
    assert svc.data_dir == settings.state / "postgres" / "data"
    assert svc.private_dirs() == [svc.home, svc.data_dir]


@pytest.fixture
def as_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """PostgresService as when we are root: the server user is faked as us, its home a temp folder."""
    home = tmp_path / "var-lib-postgresql"
    home.mkdir()
    os.chmod(home, 0o755)
    me = pwd.getpwuid(os.getuid())
    fake = pwd.struct_passwd(("postgres", "x", me.pw_uid, me.pw_gid, "", str(home), "/bin/sh"))
    monkeypatch.setattr(PostgresService, "_run_as", lambda self: "postgres")
    monkeypatch.setattr(PostgresService, "_server_user", lambda self: fake)
    return home


def test_postgres_as_root_keeps_its_cluster_in_the_server_users_home(settings: Settings, as_root: Path,
                                                                     tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o700)  # the checkout's folder: nobody else may enter it, and it stays so
    svc = PostgresService(settings)
    svc._prepare_cluster_dir()
    cluster = as_root / "changeflow" / svc.cluster_id()
    assert svc.data_dir == cluster / "data" and svc.socket_dir == cluster
    assert settings.state not in svc.data_dir.parents
    assert mode(as_root / "changeflow") == mode(cluster) == 0o700
    assert mode(svc.home) == 0o700 and mode(tmp_path) == 0o700 and mode(as_root) == 0o755
    assert (cluster / "owner").read_text().strip() == str(settings.state)
    assert (svc.home / "data").is_symlink() and os.readlink(svc.home / "data") == str(svc.data_dir)
    # The same state folder finds the same cluster again; a fresh state folder gets another.
    assert PostgresService(settings).data_dir == svc.data_dir
    other = PostgresService(Settings(state_dir=tmp_path / "other-state"))
    assert other.data_dir != svc.data_dir


def test_postgres_as_root_moves_a_cluster_of_the_earlier_layout(settings: Settings, as_root: Path) -> None:
    svc = PostgresService(settings)
    legacy = svc.home / "data"
    legacy.mkdir(parents=True)
    (legacy / "PG_VERSION").write_text("15\n")
    (legacy / "base").mkdir()
    svc._prepare_cluster_dir()
    assert (svc.data_dir / "PG_VERSION").read_text() == "15\n" and (svc.data_dir / "base").is_dir()
    assert legacy.is_symlink()
    assert svc.command()[svc.command().index("-D") + 1] == str(svc.data_dir)


def test_postgres_as_root_removes_clusters_whose_state_folder_is_gone(settings: Settings, as_root: Path,
                                                                     tmp_path: Path) -> None:
    gone = PostgresService(Settings(state_dir=tmp_path / "gone"))
    gone._prepare_cluster_dir()
    kept = PostgresService(Settings(state_dir=tmp_path / "kept"))
    kept._prepare_cluster_dir()
    foreign = as_root / "changeflow" / "not-ours"
    foreign.mkdir()
    gone_dir = gone.cluster_dir
    import shutil

    shutil.rmtree(tmp_path / "gone")
    PostgresService(settings)._prepare_cluster_dir()
    assert not gone_dir.exists()
    assert kept.cluster_dir.is_dir() and foreign.is_dir()


def test_postgres_layout_module_docstring_promises_no_parent_change() -> None:
    assert "no" in (pg_module.__doc__ or "") and "parent" in (pg_module.__doc__ or "")


# --- status: changes lost --------------------------------------------------------------------------


def test_a_lost_slot_is_a_loud_error(commerce_pipeline: object) -> None:
    lost = SlotStatus("changeflow_commerce", False, 10, None, "lost")
    message = slot_warning(lost, commerce_pipeline)  # type: ignore[arg-type]
    assert message is not None and message.startswith("CHANGES LOST")
    assert "changeflow_commerce" in message and "wal_status=lost" in message
    unreserved = slot_warning(SlotStatus("s", True, 10, 0, "unreserved"), commerce_pipeline)  # type: ignore[arg-type]
    assert unreserved is not None and "about to be invalidated" in unreserved
    for fine in ("reserved", "extended", None):
        assert slot_warning(SlotStatus("s", True, 0, 0, fine), commerce_pipeline) is None  # type: ignore[arg-type]


def test_an_offset_before_the_earliest_retained_one_is_a_loud_error() -> None:
    gaps = [RetentionGap("changeflow.orders", 0, 3, 10), RetentionGap("changeflow.orders", 2, 0, 5)]
    assert [g.lost for g in gaps] == [7, 5]
    message = retention_warning("redis", "changeflow-sink-redis", gaps)
    assert message.startswith("CHANGES LOST: sink redis (group changeflow-sink-redis)")
    assert "12 change(s)" in message and "changeflow.orders[0] committed 3 < earliest 10" in message
    assert "--to-earliest" in message and "changeflow rebuild redis" in message


@pytest.fixture
def commerce_pipeline() -> object:
    from changeflow.pipelines.load import load

    return load()


# --- worker: a taken web port ----------------------------------------------------------------------


def test_a_taken_worker_web_port_is_named_with_its_setting(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        message = web_port_taken(Settings(state_dir=tmp_path, worker_web_port=port))
    assert message is not None
    assert "CHANGEFLOW_WORKER_WEB_PORT" in message and f"127.0.0.1:{port}" in message
    assert "already in use" in message
    # Free again: the probe itself leaves nothing bound.
    assert web_port_taken(Settings(state_dir=tmp_path, worker_web_port=port)) is None
