"""A record one store refuses is quarantined for that store only; nothing crash-loops (issue 13).

A throwaway pipeline of its own (a schema and table this test creates, its own connector, slot, topics,
index, ClickHouse database and Redis prefix) with its own worker on its own web port and state directory,
so the shared commerce worker is never disturbed. The table has a jsonb column mapped in search as an
object (so a string in a later row is a mapping conflict) and an integer column typed Int16 in ClickHouse
(so a larger value is a row ClickHouse cannot take).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import redis
import yaml
from psycopg import sql

from changeflow.pipelines.load import load
from changeflow.pipelines.spec import Pipeline
from changeflow.schemas.book import schema_book
from changeflow.settings import Settings
from changeflow.sinks.clickhouse import ClickHouseStore, client_for, table_of
from changeflow.sinks.redis import row_key
from changeflow.sinks.runner import write_bisecting
from changeflow.sinks.search import index_name
from changeflow.streams.records import ChangeRecord
from tests.integration.conftest import clickhouse_password, eventually, redis_url, search_url, stop_process

pytestmark = pytest.mark.integration

FRESH = 90.0  # seconds: a new pipeline's connector and worker warm up on a busy two-core machine


def changeflow(file: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 300
               ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "changeflow", "--pipeline", str(file), *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Throwaway:
    settings: Settings
    file: Path
    pipeline: Pipeline
    schema: str
    port: int
    worker: subprocess.Popen[bytes]
    log: Path

    @property
    def items(self) -> Any:
        return self.pipeline.entities["items"]

    def pg(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.settings.pg_dsn, autocommit=True)

    def insert(self, *rows: tuple[int, Any, int, str]) -> None:
        with self.pg() as conn, conn.transaction():
            for id_, attrs, qty, label in rows:
                conn.execute(sql.SQL("INSERT INTO {}.items (id, attrs, qty, label) VALUES (%s, %s, %s, %s)").format(
                    sql.Identifier(self.schema)), (id_, json.dumps(attrs), qty, label))

    def redis_row(self, key: int) -> dict[str, Any] | None:
        raw = redis.Redis.from_url(redis_url(self.settings)).get(row_key(self.items, str(key)))
        return json.loads(raw) if raw else None

    def search_doc(self, key: int) -> dict[str, Any] | None:
        r = httpx.get(f"{search_url(self.settings)}/{index_name(self.items)}/_doc/{key}", timeout=5)
        return r.json() if r.status_code == 200 and r.json().get("found") else None

    def ch_rows(self, *keys: int) -> dict[int, tuple[Any, ...]]:
        client = client_for(self.settings)
        try:
            rows = client.query(
                f"SELECT id, qty, label, attrs, _version FROM `{table_of(self.items)[0]}`.`items` FINAL "
                f"WHERE id IN ({', '.join(str(k) for k in keys)})").result_rows
        except Exception:  # the table is made by the sink's first batch
            return {}
        finally:
            client.close()
        return {int(r[0]): r for r in rows}

    def dlq(self, store: str) -> list[dict[str, Any]]:
        result = changeflow(self.file, "dlq", "list", "--store", store, "--format", "json", timeout=120)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)  # type: ignore[no-any-return]

    def metrics(self) -> str:
        return httpx.get(f"http://127.0.0.1:{self.port}/metrics", timeout=5).text

    def alive(self) -> None:
        if self.worker.poll() is not None:
            lines = self.log.read_text(errors="replace").splitlines()
            loud = [ln for ln in lines if any(w in ln for w in ("ERROR", "CRITICAL", "Error", "fatal"))]
            raise RuntimeError(f"worker exited {self.worker.returncode}:\n" + "\n".join(loud[:40]))


@pytest.fixture(scope="module")
def throwaway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Throwaway]:
    from confluent_kafka.admin import AdminClient

    from changeflow.connectors.client import KafkaConnectClient

    settings = Settings()
    tag = uuid.uuid4().hex[:8]
    name, schema = f"q{tag}", f"q_{tag}"
    root = tmp_path_factory.mktemp("quarantine")
    file = root / "pipeline.yml"
    file.write_text(yaml.safe_dump({
        "name": name,
        "sources": {"postgres": {"database": "commerce", "host": "127.0.0.1", "schemas": [schema]}},
        "entities": {"items": {"table": f"{schema}.items", "stores": {
            "search": {"mappings": {"attrs": {"type": "object"}}},
            "clickhouse": {"types": {"qty": "Nullable(Int16)"}},
        }}},
    }, sort_keys=False))
    with psycopg.connect(settings.pg_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        conn.execute(sql.SQL("CREATE TABLE {}.items (id bigint PRIMARY KEY, attrs jsonb, qty integer, label text)")
                     .format(sql.Identifier(schema)))
    pipeline = load(file)
    port = free_port()
    log = root / "worker.log"
    env = {**os.environ, "CHANGEFLOW_STATE_DIR": str(root / "state"), "CHANGEFLOW_WORKER_WEB_PORT": str(port),
           "PYTHONUNBUFFERED": "1"}
    # The stack's secrets live in the shared state dir, not in this one (README: a worker with its own state dir).
    env["CHANGEFLOW_CLICKHOUSE_PASSWORD"] = clickhouse_password(settings)
    if settings.pg_replication_password is not None:
        env["CHANGEFLOW_PG_REPLICATION_PASSWORD"] = settings.pg_replication_password.get_secret_value()
    for name in ("redis_password", "pg_superuser_password"):
        secret = settings.stored_secret(name)
        if secret is not None:
            env.setdefault(f"CHANGEFLOW_{name.upper()}", secret.get_secret_value())
    worker: subprocess.Popen[bytes] | None = None
    try:
        applied = changeflow(file, "connectors", "apply", "--timeout", "180")
        assert applied.returncode == 0, applied.stdout + applied.stderr
        with log.open("wb") as out:
            worker = subprocess.Popen([sys.executable, "-m", "changeflow", "--pipeline", str(file), "worker"],
                                      stdout=out, stderr=subprocess.STDOUT, env=env)
        t = Throwaway(settings, file, pipeline, schema, port, worker, log)

        def up() -> bool:
            t.alive()
            try:
                return httpx.get(f"http://127.0.0.1:{port}/", timeout=2).status_code < 500
            except httpx.HTTPError:
                return False

        eventually(up, timeout=120, what="throwaway worker healthy")
        yield t
    finally:
        if worker is not None:
            stop_process(worker)
        changeflow(file, "connectors", "delete", "--yes", timeout=120)
        client = KafkaConnectClient(settings.connect_url)
        try:
            if f"{name}-postgres" in client.list():
                client.delete(f"{name}-postgres")
        finally:
            client.close()
        admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
        topics = [t for t in admin.list_topics(timeout=10).topics if t.startswith(f"{name}.")]
        for future in (admin.delete_topics(topics).values() if topics else []):
            with contextlib.suppress(Exception):
                future.result()
        with psycopg.connect(settings.pg_dsn, autocommit=True) as conn:
            slot = (pipeline.slot,)
            if conn.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", slot).fetchone():
                conn.execute("SELECT pg_drop_replication_slot(%s)", slot)
            conn.execute(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(pipeline.publication)))
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
            for table in (pipeline.signal_table, pipeline.heartbeat_table):
                conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(*table.split("."))))
        httpx.delete(f"{search_url(settings)}/{name}-*", timeout=30)
        ch = client_for(settings)
        try:
            ch.command(f"DROP DATABASE IF EXISTS `{name}`")
        finally:
            ch.close()
        rds = redis.Redis.from_url(redis_url(settings))
        for key in rds.scan_iter(match=f"{name}:*", count=1000):
            rds.delete(key)


def entry_for(entries: list[dict[str, Any]], key: int) -> dict[str, Any] | None:
    return next((e for e in entries if e["record_key"] == str(key)), None)


def test_mapping_conflict_is_quarantined_for_search_only_and_replays_after_the_fix(throwaway: Throwaway) -> None:
    t = throwaway
    t.insert((1, {"color": "red"}, 1, "first"))
    eventually(lambda: t.search_doc(1), timeout=FRESH, what="first row in search")
    # Each store's sink is a consumer of its own: Redis may take the row a little after search.
    eventually(lambda: (t.redis_row(1) or {}).get("attrs") == {"color": "red"}, timeout=FRESH, what="redis row 1")
    eventually(lambda: 1 in t.ch_rows(1), timeout=FRESH, what="first row in clickhouse")

    # The same column as a string: Redis and ClickHouse take it, search refuses it (mapping conflict).
    t.insert((2, "just a string", 2, "second"))
    eventually(lambda: (t.redis_row(2) or {}).get("attrs") == "just a string", timeout=FRESH, what="redis row 2")
    eventually(lambda: 2 in t.ch_rows(2), timeout=FRESH, what="clickhouse row 2")
    assert json.loads(t.ch_rows(2)[2][3]) == "just a string"
    quarantined = eventually(lambda: entry_for(t.dlq("search"), 2), timeout=FRESH, what="row 2 quarantined by search")
    assert quarantined["store"] == "search" and quarantined["entity"] == "items"
    assert quarantined["source_topic"] == t.items.canonical_topic
    assert quarantined["partition"] is not None and quarantined["offset"] is not None
    assert "mapper_parsing_exception" in quarantined["error"] and "attrs" in quarantined["error"]
    assert quarantined["id"] == f"{quarantined['source_topic']}:{quarantined['partition']}:{quarantined['offset']}"
    assert t.search_doc(2) is None
    # For search only: neither Redis nor ClickHouse quarantined anything of row 2.
    assert entry_for(t.dlq("redis"), 2) is None and entry_for(t.dlq("clickhouse"), 2) is None

    # Nothing stopped: a later row reaches all three stores.
    t.insert((3, {"color": "blue"}, 3, "third"))
    eventually(lambda: t.search_doc(3), timeout=FRESH, what="row 3 in search")
    eventually(lambda: t.redis_row(3), timeout=FRESH, what="row 3 in redis")
    eventually(lambda: 3 in t.ch_rows(3), timeout=FRESH, what="row 3 in clickhouse")
    t.alive()
    eventually(lambda: 'changeflow_quarantined_total{entity="items",store="search"} 1.0' in t.metrics(),
               timeout=10, what="quarantined count in /metrics")
    status = changeflow(t.file, "status", "--json", env={**os.environ, "CHANGEFLOW_WORKER_WEB_PORT": str(t.port)})
    held = {s["name"]: s["quarantined"] for s in json.loads(status.stdout)["sinks"]}
    assert held["search"] == {"items": 1} and held["redis"] == {} and held["clickhouse"] == {}, held

    # The fix, as an operator would make it: the pipeline file maps `attrs` as not indexed, and a new
    # physical index with that mapping takes the documents (under their external versions) and the alias.
    data = yaml.safe_load(t.file.read_text())
    data["entities"]["items"]["stores"]["search"]["mappings"]["attrs"] = {"type": "object", "enabled": False}
    t.file.write_text(yaml.safe_dump(data, sort_keys=False))
    base, alias = search_url(t.settings), index_name(t.items)
    old = next(iter(httpx.get(f"{base}/{alias}/_alias", timeout=10).json()))
    mapping = httpx.get(f"{base}/{old}/_mapping", timeout=10).json()[old]["mappings"]
    mapping["properties"]["attrs"] = {"type": "object", "enabled": False}
    new = f"{alias}-000002"
    created = httpx.put(f"{base}/{new}", json={"mappings": mapping, "settings": {"index": {
        "gc_deletes": "7d", "number_of_replicas": 0}}}, timeout=30)
    assert created.status_code == 200, created.text
    copied = httpx.post(f"{base}/_reindex?refresh=true", json={
        "source": {"index": old}, "dest": {"index": new, "version_type": "external"}}, timeout=60)
    assert copied.status_code == 200 and not copied.json()["failures"], copied.text
    swapped = httpx.post(f"{base}/_aliases", json={"actions": [
        {"remove": {"index": old, "alias": alias}},
        {"add": {"index": new, "alias": alias, "is_write_index": True}}]}, timeout=30)
    assert swapped.status_code == 200, swapped.text

    result = changeflow(t.file, "dlq", "replay", "--store", "search", "--id", quarantined["id"], "--format", "json")
    assert result.returncode == 0, result.stdout + result.stderr
    outcome = json.loads(result.stdout)
    assert [(r["store"], r["outcome"]) for r in outcome["replayed"]] == [("search", "applied")]
    doc = t.search_doc(2)
    assert doc is not None and doc["_source"]["attrs"] == "just a string"
    assert doc["_version"] == int(quarantined["version"])
    # Recorded: a second replay skips it.
    again = json.loads(changeflow(t.file, "dlq", "replay", "--store", "search", "--format", "json").stdout)
    assert quarantined["id"] in [s["id"] for s in again["skipped"]]

    # The version was never lost: a newer change of the same key still applies, and a forced replay of the
    # old one changes nothing (the store holds a newer version).
    with t.pg() as conn:
        conn.execute(sql.SQL("UPDATE {}.items SET label = 'updated' WHERE id = 2").format(sql.Identifier(t.schema)))
    eventually(lambda: ((t.search_doc(2) or {}).get("_source") or {}).get("label") == "updated", timeout=FRESH,
               what="newer version of row 2 in search")
    forced = changeflow(t.file, "dlq", "replay", "--store", "search", "--id", quarantined["id"], "--force",
                        "--format", "json")
    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert [r["outcome"] for r in json.loads(forced.stdout)["replayed"]] == ["superseded"]
    assert ((t.search_doc(2) or {}).get("_source") or {}).get("label") == "updated"
    t.alive()


def test_a_row_clickhouse_refuses_is_quarantined_while_the_rest_of_its_batch_lands(throwaway: Throwaway) -> None:
    t = throwaway
    # One source transaction: 70000 does not fit the Int16 the pipeline file gives `qty` in ClickHouse.
    t.insert((10, {"n": 1}, 5, "ok"), (11, {"n": 2}, 70_000, "too big"), (12, {"n": 3}, 7, "ok too"))
    eventually(lambda: set(t.ch_rows(10, 12)) == {10, 12}, timeout=FRESH, what="rows 10 and 12 in clickhouse")
    refused = eventually(lambda: entry_for(t.dlq("clickhouse"), 11), timeout=FRESH, what="row 11 quarantined")
    assert refused["store"] == "clickhouse" and "Int16" in refused["error"]
    assert 11 not in t.ch_rows(11)
    # The other stores took it.
    eventually(lambda: (t.redis_row(11) or {}).get("qty") == 70_000, timeout=FRESH, what="row 11 in redis")
    eventually(lambda: t.search_doc(11), timeout=FRESH, what="row 11 in search")
    t.alive()

    # One batch for certain: the store refuses it as a whole, the runner's bisection hands back exactly the
    # refused row and the others are written.
    sv = schema_book(t.settings, t.pipeline, writer=False).latest["items"]

    def record(key: int, qty: int) -> ChangeRecord:
        return ChangeRecord("postgres", "items", str(key), "c", 10**12 + key, int(time.time() * 1000), None,
                            {"id": key, "attrs": {"n": key}, "qty": qty, "label": "direct"},
                            key_columns=sv.key_columns, types=sv.columns, schema=sv)

    store = ClickHouseStore(t.settings, t.pipeline)
    try:
        rejected = write_bisecting(store, [record(k, 40_000 if k == 23 else k) for k in range(20, 28)])
    finally:
        store.close()
    assert [r.record.key for r in rejected] == ["23"]
    assert set(t.ch_rows(*range(20, 28))) == set(range(20, 28)) - {23}


def test_a_row_the_clickhouse_server_refuses_is_quarantined_with_the_servers_reason(throwaway: Throwaway) -> None:
    """A refusal the server makes (a CHECK constraint an operator added), not the client: the server answers
    with ClickHouse's error (code 469), the sink bisects the batch, quarantines that row, writes the rest."""
    t = throwaway
    eventually(lambda: t.ch_rows(10), timeout=FRESH, what="the items table exists")
    client = client_for(t.settings)
    try:
        client.command(f"ALTER TABLE `{table_of(t.items)[0]}`.`items` "
                       "ADD CONSTRAINT label_allowed CHECK ifNull(label, '') != 'forbidden'")
        t.insert((40, {"n": 40}, 1, "fine"), (41, {"n": 41}, 2, "forbidden"), (42, {"n": 42}, 3, "fine too"))
        eventually(lambda: set(t.ch_rows(40, 42)) == {40, 42}, timeout=FRESH, what="rows 40 and 42 in clickhouse")
        refused = eventually(lambda: entry_for(t.dlq("clickhouse"), 41), timeout=FRESH, what="row 41 quarantined")
        assert refused["store"] == "clickhouse"
        assert "VIOLATED_CONSTRAINT" in refused["error"] or "469" in refused["error"], refused["error"]
        assert 41 not in t.ch_rows(41)
        eventually(lambda: (t.redis_row(41) or {}).get("label") == "forbidden", timeout=FRESH, what="41 in redis")
        t.alive()
    finally:
        with contextlib.suppress(Exception):
            client.command(f"ALTER TABLE `{table_of(t.items)[0]}`.`items` DROP CONSTRAINT label_allowed")
        client.close()
