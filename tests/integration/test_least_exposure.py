"""Least exposure of the live native stack (issue 11, section 4).

- Kafka Connect resolves only what it is meant to: a connector config that names ``${file:/etc/passwd:...}``
  or an environment variable outside ``CHANGEFLOW_*`` keeps the reference unresolved (the validate endpoint
  echoes a resolved value in its errors, so an unrestricted worker hands out any file or variable), while a
  secret kept in ``<state>/secrets/`` and ``CHANGEFLOW_*`` variables still resolve; no connector overrides the
  worker's client settings. Only the validate endpoint is used: nothing is registered.
- Every state folder is 0700, and the PostgreSQL server (the ``postgres`` user when we are root) keeps its
  cluster where it can reach it without any permission added to a parent of the state directory.
- `changeflow status` says loudly, with exit 1, when a sink's committed offset lies before its topic's earliest
  retained offset (a throwaway pipeline, topic and group).
- A second worker on a host whose web port is taken exits non-zero naming CHANGEFLOW_WORKER_WEB_PORT,
  before any sink process starts.

The Connect and PostgreSQL checks need servers started with this version's configuration: a stack started
before it fails them with the hint to restart that service (`changeflow stack down connect postgres`, then
`changeflow stack up`).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from changeflow.deploy.connect import ConnectService
from changeflow.deploy.jvm import properties
from changeflow.deploy.postgres import PostgresService
from changeflow.reports.status import retention_gaps
from changeflow.settings import Settings

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
VALIDATE = "/connector-plugins/PostgresConnector/config/validate"
RESTART_HINT = ("(a worker started before this configuration: `changeflow stack down {0}` then "
                "`changeflow stack up`)")


# --- Kafka Connect ---------------------------------------------------------------------------------


def _validate(settings: Settings, **overrides: str) -> dict[str, list[str]]:
    """Connect's validation of a throwaway PostgreSQL connector config: field -> its errors."""
    config = {
        "connector.class": "io.debezium.connector.postgresql.PostgresConnector",
        "topic.prefix": f"lxprobe{uuid.uuid4().hex[:8]}",
        "database.hostname": "127.0.0.1",
        "database.port": "1",  # nothing listens: validation never reaches a database
        "database.user": "nobody",
        "database.dbname": "nothing",
        "plugin.name": "pgoutput",
        **overrides,
    }
    response = httpx.put(f"{settings.connect_url}{VALIDATE}", json=config, timeout=60)
    assert response.status_code == 200, response.text
    return {c["value"]["name"]: c["value"]["errors"] for c in response.json()["configs"]}


def _hostname_errors(settings: Settings, reference: str) -> str:
    return " ".join(_validate(settings, **{"database.hostname": reference})["database.hostname"])


def _unresolved(errors: str, reference: str) -> bool:
    """Debezium checks a hostname's format: an unresolved reference is quoted back as it stands."""
    return f"{reference} has invalid format" in errors


def test_the_live_connect_worker_runs_the_current_configuration(connect: Any, live_stack: Settings) -> None:
    service = ConnectService(live_stack)
    written = (service.config_dir / "connect-distributed.properties").read_text()
    assert written == properties(service.worker_properties()), RESTART_HINT.format("connect")


@pytest.mark.parametrize("reference", ["${file:/etc/passwd:root}", "${dir:/etc:passwd}", "${dir:/etc:hostname}"])
def test_connect_refuses_a_file_outside_the_secrets_folder(connect: Any, live_stack: Settings, reference: str) -> None:
    errors = _hostname_errors(live_stack, reference)
    hint = RESTART_HINT.format("connect")
    assert "/bin/" not in errors and ":0:0:" not in errors, f"{reference} was read: {errors} {hint}"
    assert _unresolved(errors, reference), errors


def test_connect_refuses_a_path_that_climbs_out_of_the_secrets_folder(connect: Any, live_stack: Settings) -> None:
    secrets = live_stack.state / "secrets"
    for reference in (f"${{dir:{secrets}/..:secrets}}", f"${{dir:{secrets}:../../../etc/passwd}}",
                      f"${{file:{secrets}/../../../../etc/passwd:root}}"):
        errors = _hostname_errors(live_stack, reference)
        assert _unresolved(errors, reference), f"{reference}: {errors}"


@pytest.mark.parametrize("variable", ["PATH", "HOME", "PWD"])
def test_connect_refuses_an_environment_variable_outside_changeflow(connect: Any, live_stack: Settings,
                                                                     variable: str) -> None:
    reference = f"${{env:{variable}}}"
    errors = _hostname_errors(live_stack, reference)
    assert _unresolved(errors, reference), f"{reference} was resolved: {errors} {RESTART_HINT.format('connect')}"


def test_connect_still_resolves_changeflow_variables_and_the_secrets_folder(connect: Any, live_stack: Settings) -> None:
    reference = "${env:CHANGEFLOW_PG_HOST}"
    assert not _unresolved(_hostname_errors(live_stack, reference), reference)
    secret = live_stack.state / "secrets" / f"lx_probe_{uuid.uuid4().hex[:8]}"
    secret.write_text("probe-host.invalid")
    try:
        # pipeline `${file:<secrets>/name}` renders as this (changeflow/connectors/render.py)
        reference = f"${{dir:{secret.parent}:{secret.name}}}"
        errors = _hostname_errors(live_stack, reference)
        assert not _unresolved(errors, reference), f"{reference} did not resolve: {errors} " + RESTART_HINT.format(
            "connect")
    finally:
        secret.unlink()


def test_connect_refuses_client_overrides(connect: Any, live_stack: Settings) -> None:
    errors = _validate(live_stack, **{"producer.override.bootstrap.servers": "127.0.0.1:1"})
    assert any("policy does not allow" in e for e in errors["producer.override.bootstrap.servers"]), errors


# --- state folders ---------------------------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_every_state_folder_of_the_live_stack_is_private(live_stack: Settings) -> None:
    state = live_stack.state
    for name in ("postgres", "redis", "kafka", "search", "clickhouse", "connect", "secrets"):
        assert (state / name).is_dir(), name
        assert _mode(state / name) == 0o700, f"{state / name} is {oct(_mode(state / name))}"
    for name in ("worker-data", "logs", "fatal"):
        if (state / name).exists():
            assert _mode(state / name) == 0o700, f"{state / name} is {oct(_mode(state / name))}"
    for data in (state / "kafka" / "data", state / "search" / "data", state / "clickhouse" / "data"):
        assert _mode(data) == 0o700, f"{data} is {oct(_mode(data))}"


def test_postgres_data_is_private_and_reachable_without_opening_a_parent(live_stack: Settings) -> None:
    service = PostgresService(live_stack)
    with psycopg.connect(live_stack.pg_dsn, connect_timeout=5) as conn:
        running = Path(str(conn.execute("SHOW data_directory").fetchone()[0]))  # type: ignore[index]
        keep = conn.execute("SHOW max_slot_wal_keep_size").fetchone()[0]  # type: ignore[index]
    assert running.resolve() == service.data_dir.resolve(), (
        f"the server runs on {running}, not {service.data_dir} {RESTART_HINT.format('postgres')}")
    assert _mode(service.data_dir) == 0o700
    assert keep != "-1", f"max_slot_wal_keep_size is unset {RESTART_HINT.format('postgres')}"
    if os.geteuid() == 0:
        # Run as the postgres user: its cluster is in its own home, not behind the state directory.
        assert live_stack.state not in service.data_dir.parents
        assert service.data_dir.owner() == "postgres"


# --- status: changes lost to retention -------------------------------------------------------------


@pytest.fixture
def throwaway_pipeline(tmp_path: Path, live_stack: Settings) -> Iterator[tuple[Path, str, str]]:
    """A pipeline file of its own name (its own canonical topic and sink groups), not run by any worker."""
    name = f"lx{uuid.uuid4().hex[:10]}"
    file = tmp_path / "pipeline.yml"
    file.write_text(
        f"name: {name}\n"
        "sources:\n  postgres:\n    database: commerce\n"
        "entities:\n  items:\n    source: postgres\n    table: public.products\n"
    )
    topic, group = f"{name}.items", f"{name}-sink-redis"
    admin = AdminClient({"bootstrap.servers": live_stack.kafka_bootstrap})
    for future in admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)]).values():
        future.result()
    try:
        yield file, topic, group
    finally:
        for future in admin.delete_topics([topic], operation_timeout=15).values():
            future.result()
        groups = [g.group_id for g in admin.list_consumer_groups().result().valid if g.group_id.startswith(name)]
        if groups:
            for future in admin.delete_consumer_groups(groups).values():
                future.exception()


def test_status_says_loudly_when_a_sink_offset_lies_before_the_earliest_retained(
        live_stack: Settings, throwaway_pipeline: tuple[Path, str, str]) -> None:
    file, topic, group = throwaway_pipeline
    producer = Producer({"bootstrap.servers": live_stack.kafka_bootstrap})
    for i in range(10):
        producer.produce(topic, key=f"k{i}", value=b"{}", partition=0)
    assert producer.flush(15) == 0
    committer = Consumer({"bootstrap.servers": live_stack.kafka_bootstrap, "group.id": group,
                          "enable.auto.commit": False})
    try:
        committer.commit(offsets=[TopicPartition(topic, 0, 3)], asynchronous=False)
    finally:
        committer.close()
    assert retention_gaps(live_stack, group, [topic]) == []  # nothing deleted yet
    admin = AdminClient({"bootstrap.servers": live_stack.kafka_bootstrap})
    for future in admin.delete_records([TopicPartition(topic, 0, 6)]).values():
        future.result()  # what retention does to old segments: the earliest offset moves to 6

    gaps = retention_gaps(live_stack, group, [topic])
    assert [(g.topic, g.partition, g.committed, g.earliest, g.lost) for g in gaps] == [(topic, 0, 3, 6, 3)]

    done = subprocess.run([sys.executable, "-m", "changeflow", "--pipeline", str(file), "status", "--json"],
                          capture_output=True, text=True, timeout=180, cwd=REPO)
    assert done.returncode == 1, done.stdout + done.stderr
    status = json.loads(done.stdout)
    lost = [e for e in status["errors"] if e.startswith("CHANGES LOST")]
    assert any(f"sink redis (group {group})" in e and f"{topic}[0] committed 3 < earliest 6" in e for e in lost), lost
    redis = next(s for s in status["sinks"] if s["name"] == "redis")
    assert redis["lost"] == {f"{topic}:0": 3}
    # The table form prints the same line (stderr), and exits 1 too.
    table = subprocess.run([sys.executable, "-m", "changeflow", "--pipeline", str(file), "status"],
                           capture_output=True, text=True, timeout=180, cwd=REPO)
    assert table.returncode == 1 and "CHANGES LOST" in table.stderr, table.stderr


# --- a second worker on a taken web port -----------------------------------------------------------


def _children_of(pid: int) -> dict[int, str]:
    """pid -> command line of each child process of ``pid``."""
    out = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if int(fields[1]) == pid:
                out[int(proc.name)] = cmdline
    return out


def test_a_second_worker_on_a_taken_web_port_stops_before_any_sink_starts(pipeline: Settings) -> None:
    env = {**os.environ, "CHANGEFLOW_WORKER_WEB_PORT": str(pipeline.worker_web_port)}
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "changeflow", "worker"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
    children: dict[int, str] = {}
    while proc.poll() is None and time.monotonic() - started < 60:
        children.update(_children_of(proc.pid))
        time.sleep(0.01)
    if proc.poll() is None:
        proc.kill()
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1, out + err
    assert "CHANGEFLOW_WORKER_WEB_PORT" in err and f":{pipeline.worker_web_port}" in err, err
    assert "process_started" not in out + err, "a sink process started"
    # Sink processes are spawned by multiprocessing (changeflow/sinks/process.py); a library's short-lived helper
    # (a fork on its way to exec) is not one.
    sinks = {pid: cmd for pid, cmd in children.items() if "multiprocessing" in cmd}
    assert not sinks, f"sink processes started: {sinks}"
    assert time.monotonic() - started < 30
    # The shared worker is untouched.
    assert httpx.get(f"http://127.0.0.1:{pipeline.worker_web_port}/changeflow/sinks/", timeout=5).status_code == 200
