"""The CLI an operator can trust, against the live stack: a worker that says why it stopped, exit codes,
`status` after the worker died, a crash loop named, an atomic `sinks reset all`, the worker in `stack status`.

The worker under test is a second `changeflow worker` on a throwaway pipeline (its own name, so its own
topics, consumer groups and ClickHouse database), in a state directory and on a web port of its own: the
shared worker and the commerce pipeline are never touched. Its records are Debezium-shaped messages written
straight to the throwaway pipeline's raw topic (no connector, no replication slot).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from confluent_kafka import Producer

from changeflow.bench.common import delete_groups_with_prefix, delete_topics_with_prefix, free_port
from changeflow.bench.envelopes import backlog
from changeflow.pipelines.load import load
from changeflow.pipelines.spec import Pipeline
from changeflow.settings import Settings
from changeflow.sinks.clickhouse import client_for, home_database
from changeflow.sinks.process import EXIT_CRASH_LOOP, EXIT_SINK_FATAL, committed_offsets, fatal_file
from tests.integration.conftest import clickhouse_password, eventually, search_url

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Throwaway:
    """A pipeline of one entity (products, in ClickHouse and the search index), with its own state dir and port."""

    file: Path
    pipeline: Pipeline
    state: Path
    port: int
    live: Settings

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHANGEFLOW_")}
        env.update({
            "CHANGEFLOW_STATE_DIR": str(self.state),
            "CHANGEFLOW_WORKER_WEB_PORT": str(self.port),
            # The state dir is a fresh one: the live stack's ClickHouse password is not in it.
            "CHANGEFLOW_CLICKHOUSE_PASSWORD": clickhouse_password(self.live),
            "PYTHONUNBUFFERED": "1",
        })
        env.update(extra)
        return env

    def cli(self, *args: str, timeout: float = 180, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "changeflow", "--pipeline", str(self.file), *args],
                              capture_output=True, text=True, timeout=timeout, cwd=self.state.parent,
                              env=self.env(**env))

    def worker(self, sinks: str, log: str, **env: str) -> subprocess.Popen[bytes]:
        out = (self.state.parent / log).open("wb")
        return subprocess.Popen([sys.executable, "-m", "changeflow", "--pipeline", str(self.file), "worker",
                                 "--sinks", sinks], stdout=out, stderr=subprocess.STDOUT, cwd=self.state.parent,
                                env=self.env(**env))

    def log(self, name: str) -> str:
        return (self.state.parent / name).read_text(errors="replace")[-3000:]

    @property
    def topic(self) -> str:
        return self.pipeline.entities["products"].canonical_topic

    def committed(self, store: str) -> dict[str, int | None]:
        return committed_offsets(self.live, self.pipeline.sink_group(store), [self.topic])

    def applied(self, store: str) -> int:
        return sum(v for v in self.committed(store).values() if v is not None)

    def status(self) -> tuple[int, dict[str, dict[str, object]], list[str]]:
        """`status --json`: exit code, sinks by name, the error lines (the table form prints them to stderr)."""
        done = self.cli("status", "--json")
        data = json.loads(done.stdout)
        return done.returncode, {s["name"]: s for s in data["sinks"]}, data["errors"]


@pytest.fixture
def throwaway(live_stack: Settings, tmp_path: Path) -> Iterator[Throwaway]:
    name = f"cliop_{uuid.uuid4().hex[:8]}"
    file = tmp_path / "pipeline.yml"
    file.write_text(f"""name: {name}
sources:
  postgres:
    database: commerce
entities:
  products:
    source: postgres
    table: public.products
    stores:
      redis: false
      search: {{index: {name}-products}}
""")
    state = tmp_path / "state"
    state.mkdir()
    t = Throwaway(file, load(file), state, free_port(), live_stack)
    yield t
    delete_groups_with_prefix(live_stack, name)
    delete_topics_with_prefix(live_stack, name)
    with contextlib.suppress(Exception):
        client = client_for(live_stack)
        client.command(f"DROP DATABASE IF EXISTS {home_database(t.pipeline)}")
        client.close()
    with contextlib.suppress(httpx.HTTPError):
        httpx.delete(f"{search_url(live_stack)}/{name}-products*", timeout=30)


def produce(t: Throwaway, messages: list[tuple[bytes, bytes | None]]) -> None:
    producer = Producer({"bootstrap.servers": t.live.kafka_bootstrap})
    for key, value in messages:
        producer.produce(f"{t.pipeline.postgres_topic_prefix}.public.products", key=key, value=value)
    assert producer.flush(30) == 0


def wait_exit(proc: subprocess.Popen[bytes], timeout: float = 150) -> int:
    try:
        return proc.wait(timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        wait_exit(proc, 60)


def sink_states(t: Throwaway) -> dict[str, dict[str, object]]:
    response = httpx.get(f"http://127.0.0.1:{t.port}/changeflow/sinks/", timeout=3)
    response.raise_for_status()
    states: dict[str, dict[str, object]] = response.json()
    return states


def test_a_fatal_store_error_stops_the_worker_non_zero_and_status_says_why_then_names_the_crash_loop(
        throwaway: Throwaway) -> None:
    t = throwaway
    changes = [(k, v) for k, v in backlog(t.pipeline.postgres_topic_prefix, 4, id_base=910_000_000_001)
               if v is not None]

    # 1. A healthy worker of the ClickHouse sink applies a first change.
    worker = t.worker("clickhouse", "worker-1.log")
    try:
        produce(t, changes[:1])
        eventually(lambda: t.applied("clickhouse") >= 1, timeout=150, what="first change committed by clickhouse")
        # 2. Mid-stream the store loses a table it writes every batch to: the next batch fails fatally.
        client = client_for(t.live)
        client.command(f"DROP TABLE {home_database(t.pipeline)}.changelog")
        client.close()
        before = t.committed("clickhouse")
        produce(t, changes[1:2])
        code = wait_exit(worker)
    finally:
        stop(worker)
    assert code == EXIT_SINK_FATAL, t.log("worker-1.log")
    assert t.committed("clickhouse") == before  # the refused batch is not committed

    # 3. `status` (the worker is gone) says which sink stopped it, on which record, and why.
    record = json.loads(fatal_file(t.state, t.pipeline).read_text())["clickhouse"]
    assert record["topic"] == t.topic and record["stops"] == 1
    assert f"{record['topic']}:{record['partition']}" in before
    assert record["offset"] == before[f"{record['topic']}:{record['partition']}"]
    rc, sinks, errors = t.status()
    assert rc == 1
    stopped = sinks["clickhouse"]["stopped"]
    assert isinstance(stopped, dict) and sinks["clickhouse"]["crash_loop"] is False
    assert (stopped["topic"], stopped["partition"], stopped["offset"]) == (
        record["topic"], record["partition"], record["offset"])
    assert "UNKNOWN_TABLE" in str(stopped["error"]) and "changelog" in str(stopped["error"])
    line = next(x for x in errors if x.startswith("sink clickhouse stopped the worker"))
    assert (f"(exit {EXIT_SINK_FATAL})" in line and
            f"on topic {t.topic} partition {record['partition']} offset {record['offset']}: " in line)
    table = t.cli("status")
    assert table.returncode == 1 and "stopped the worker" in table.stdout
    assert line in table.stderr.splitlines()

    # 4. Restarted, it stops again on the same batch (now a wrong password: before its first batch): a crash loop.
    again = t.worker("clickhouse", "worker-2.log", CHANGEFLOW_CLICKHOUSE_PASSWORD="not-the-password")
    try:
        code = wait_exit(again)
    finally:
        stop(again)
    assert code == EXIT_CRASH_LOOP, t.log("worker-2.log")
    rc, sinks, errors = t.status()
    assert rc == 1 and sinks["clickhouse"]["crash_loop"] is True
    assert "AUTHENTICATION_FAILED" in str(sinks["clickhouse"]["last_error"])
    line = next(x for x in errors if x.startswith("sink clickhouse is crash-looping"))
    assert f"stopped the worker 2 times on the same batch (topic {t.topic} partition {record['partition']} " \
           f"offset {record['offset']})" in line
    assert "crash-looping" in t.cli("status").stdout

    # 5. The cause fixed (right password; the sink's setup creates the missing table again): it moves past the
    # batch, and `status` no longer reports the stop, with the worker up or down.
    healed = t.worker("clickhouse", "worker-3.log")
    try:
        eventually(lambda: t.applied("clickhouse") > sum(v or 0 for v in before.values()), timeout=150,
                   what="the refused batch applied after the fix")
        eventually(lambda: sink_states(t)["clickhouse"]["healthy"], timeout=30, what="clickhouse sink healthy")
        rc, sinks, _ = t.status()
        assert sinks["clickhouse"]["stopped"] is None and sinks["clickhouse"]["healthy"] is True
        assert sinks["redis"]["running"] is False  # `--sinks clickhouse`: shown as not run, not as failing
    finally:
        healed.send_signal(signal.SIGTERM)
        code = wait_exit(healed, 90)
    assert code == 0, t.log("worker-3.log")
    _, sinks, errors = t.status()
    assert sinks["clickhouse"]["stopped"] is None and sinks["clickhouse"]["healthy"] is None
    assert not [e for e in errors if "stopped the worker" in e or "crash-looping" in e]

    # Everything the worker wrote is under the state dir: Faust's data dir too, nothing in the folder it ran in.
    assert list((t.state / "worker-data").iterdir())
    assert sorted(p.name for p in t.state.parent.iterdir()) == [
        "pipeline.yml", "state", "worker-1.log", "worker-2.log", "worker-3.log"]


def test_sinks_reset_all_checks_every_sink_first_and_its_hint_stops_the_worker(throwaway: Throwaway) -> None:
    t = throwaway
    changes = [(k, v) for k, v in backlog(t.pipeline.postgres_topic_prefix, 4, id_base=920_000_000_001)
               if v is not None]
    produce(t, changes[:2])
    first = t.worker("clickhouse", "worker-ch.log")
    try:
        eventually(lambda: t.applied("clickhouse") >= 2, timeout=150, what="changes committed by clickhouse")
    finally:
        stop(first)
    committed = t.committed("clickhouse")

    # Only the search sink runs (the last in registry order): `all` refuses before resetting clickhouse.
    search = t.worker("search", "worker-search.log")
    try:
        eventually(lambda: t.applied("search") >= 2, timeout=150, what="changes committed by search")
        done = t.cli("sinks", "reset", "all", "--to-earliest")
        assert done.returncode == 1, done.stderr
        line = done.stderr.strip()
        assert "\n" not in line
        assert line.startswith(f"error: a worker is consuming, nothing was reset: {t.pipeline.sink_group('search')} "
                               "(1 member(s)")
        assert t.committed("clickhouse") == committed
        # The hint names this worker (not started by `stack`), and the command it gives stops it.
        assert line.endswith(f"Stop the worker first: Ctrl-C in its terminal, or `kill {search.pid}` (the worker "
                             f"answering on port {t.port})")
        stack_status = json.loads(t.cli("stack", "status", "--json").stdout)
        row = next(s for s in stack_status if s["name"] == "worker")
        assert (row["healthy"], row["pid"], row["detail"]) == (
            True, search.pid, "not started by changeflow (a foreground worker)")
        subprocess.run(["kill", str(search.pid)], check=True)
        assert wait_exit(search, 90) == 0
    finally:
        stop(search)

    done = t.cli("sinks", "reset", "all", "--to-earliest")
    assert done.returncode == 0, done.stderr
    assert f"sink clickhouse: reset to earliest; {len(changes[:2])} records will be replayed" in done.stdout
    assert all(v == 0 for v in t.committed("clickhouse").values() if v is not None)


def test_stack_status_shows_the_shared_worker_from_any_folder(pipeline: Settings, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "CHANGEFLOW_STATE_DIR"}
    done = subprocess.run([sys.executable, "-m", "changeflow", "stack", "status", "--json"], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    rows = {s["name"]: s for s in json.loads(done.stdout)}
    assert all(rows[n]["healthy"] for n in ("postgres", "redis", "clickhouse", "search", "kafka", "connect")), rows
    assert rows["worker"]["healthy"] is True and rows["worker"]["url"] == f"http://127.0.0.1:{pipeline.worker_web_port}"
    assert isinstance(rows["worker"]["pid"], int)
    assert not list(tmp_path.iterdir())  # nothing written into the folder it ran from


def test_usage_errors_that_need_the_stack_are_one_line_with_exit_code_2(pipeline: Settings) -> None:
    def changeflow(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "changeflow", *args], capture_output=True, text=True,
                              timeout=120, cwd=REPO)

    for args, message in [
        (("report", "drift", "--entity", "bogus"),
         "error: unknown entity 'bogus'; this pipeline (commerce) has: products, orders, payments, refunds, users, "
         "ny_orders, order_stats"),
        (("reconcile", "--entity", "payments", "--store", "redis"),
         "error: payments is not stored in redis; it is stored in clickhouse"),
        (("connectors", "apply", "/tmp/nope.json"), "error: connector file /tmp/nope.json: no such file"),
    ]:
        done = changeflow(*args)
        assert (done.returncode, done.stderr.strip(), done.stdout) == (2, message, "")
    drift = changeflow("report", "drift", "--entity", "products", "--format", "json")
    assert drift.returncode in (0, 1) and [r["entity"] for r in json.loads(drift.stdout)] == ["products"]


def test_a_batch_the_decode_stage_cannot_deliver_stops_the_worker_with_exit_1(throwaway: Throwaway) -> None:
    """The canonical topic refuses the record (its max.message.bytes is made tiny): the decode stage stops
    the worker without committing the raw batch, and the exit code says it failed (not 0)."""
    from confluent_kafka.admin import AdminClient, NewTopic

    t = throwaway
    admin = AdminClient({"bootstrap.servers": t.live.kafka_bootstrap})
    admin.create_topics([NewTopic(t.topic, num_partitions=3, replication_factor=1,
                                  config={"max.message.bytes": "64"})])[t.topic].result(30)
    worker = t.worker("clickhouse", "worker-decode.log")
    try:
        def up() -> bool:
            try:
                return worker.poll() is not None or bool(sink_states(t))
            except httpx.HTTPError:
                return False

        eventually(up, timeout=120, what="worker up")
        produce(t, [(k, v) for k, v in backlog(t.pipeline.postgres_topic_prefix, 1, id_base=920_000_000_001)
                    if v is not None])
        code = wait_exit(worker)
    finally:
        stop(worker)
    assert code == 1, t.log("worker-decode.log")
    assert "event=decode_failed" in t.log("worker-decode.log")
    raw = f"{t.pipeline.postgres_topic_prefix}.public.products"
    assert all(v is None for v in committed_offsets(t.live, t.pipeline.decode_group, [raw]).values())
