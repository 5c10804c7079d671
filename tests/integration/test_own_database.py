"""A second pipeline that is not commerce, end to end, beside the commerce pipeline on the same stack.

The test creates its own PostgreSQL database with a table holding every supported column type, a
composite-key table in a schema with an odd name, a key not called ``id`` and a table without a primary
key; ``changeflow init`` writes the pipeline file, ``pipeline check`` passes, ``connectors apply``
registers its connector, a worker of its own runs it (``--pipeline``), and the exact values are asserted
in Redis, the search index and ClickHouse after the snapshot, inserts, updates and deletes. ``reconcile
--full`` then reports zero drift for every entity and store. Everything it creates is removed at the end.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import date, datetime
from decimal import Decimal
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
from changeflow.schemas.topic import read_versions
from changeflow.settings import Settings
from changeflow.sinks.clickhouse import client_for, table_of
from changeflow.sinks.redis import row_key
from changeflow.sinks.search import index_name
from tests.integration.conftest import eventually, redis_url, search_url, stop_process

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
WEB_PORT = 6170
UID = uuid.UUID("0b6f2c9e-3d1a-4c55-9a7e-2f1d0c3b4a59")

EVERY_TYPE = """
CREATE TABLE {s}.everything (
  id bigint PRIMARY KEY,
  c_small smallint, c_int integer, c_big bigint, c_num numeric(12,3), c_exact numeric,
  c_real real, c_double double precision, c_bool boolean,
  c_text text, c_varchar varchar(20), c_char char(3), c_uuid uuid,
  c_date date, c_time time, c_timetz timetz, c_ts timestamp, c_tstz timestamptz, c_interval interval,
  c_json json, c_jsonb jsonb, c_bytea bytea, c_ints integer[], c_texts text[], c_mood {s}.{mood}
)
"""
EVERY_INSERT = (
    "INSERT INTO {s}.everything VALUES (%(id)s, -32768, 2147483647, 9223372036854775807, 123456789.123, "
    "%(exact)s, 1.5, 2.25, true, %(text)s, 'short', 'ab', %(uuid)s, '1969-12-31', '23:59:59.999999', "
    "'10:00:00+02', '2026-01-02 03:04:05.678901', '2026-01-02 03:04:05.678901+00', '1 day 2 hours', "
    "'{{\"a\": [1, \"x\"]}}', '{{\"n\": 7, \"ok\": true}}', '\\x00ff', '{{1,NULL,3}}', '{{\"a\",\"b c\"}}', 'vip')"
)
EXACT = Decimal("12345678901234567890.000000000001")
ODD_CODE = 'C"2\\ \'x'  # a key with a quote, a backslash, a space and an apostrophe
TEXT = 'tab\t"quote" \\ ü'


def expected_json(row_id: int, text: str = TEXT) -> dict[str, Any]:
    """The row as the JSON stores (Redis, search) hold it: README "Types" (exact decimals as strings,
    times as ISO text, bytes as base64, intervals as microseconds)."""
    return {
        "id": row_id, "c_small": -32768, "c_int": 2147483647, "c_big": 9223372036854775807,
        "c_num": "123456789.123", "c_exact": str(EXACT), "c_real": 1.5, "c_double": 2.25, "c_bool": True,
        "c_text": text, "c_varchar": "short", "c_char": "ab ", "c_uuid": str(UID), "c_date": "1969-12-31",
        "c_time": "23:59:59.999999", "c_timetz": "08:00:00+00:00", "c_ts": "2026-01-02T03:04:05.678901+00:00",
        "c_tstz": "2026-01-02T03:04:05.678901+00:00", "c_interval": 93_600_000_000,
        "c_json": {"a": [1, "x"]}, "c_jsonb": {"n": 7, "ok": True}, "c_bytea": base64.b64encode(b"\x00\xff").decode(),
        "c_ints": [1, None, 3], "c_texts": ["a", "b c"], "c_mood": "vip",
    }


def expected_clickhouse(row_id: int, text: str = TEXT) -> dict[str, Any]:
    """The row as ClickHouse returns it through clickhouse-connect: typed columns (README "Types"). The client
    returns UTC instants as naive datetimes (its default `tz_mode`), and bytes when asked for them."""
    at = datetime(2026, 1, 2, 3, 4, 5, 678901)
    return {
        "id": row_id, "c_small": -32768, "c_int": 2147483647, "c_big": 9223372036854775807,
        "c_num": Decimal("123456789.123"), "c_exact": str(EXACT), "c_real": 1.5, "c_double": 2.25, "c_bool": True,
        "c_text": text, "c_varchar": "short", "c_char": "ab ", "c_uuid": str(UID), "c_date": date(1969, 12, 31),
        "c_time": "23:59:59.999999", "c_timetz": "08:00:00+00:00", "c_ts": at, "c_tstz": at,
        "c_interval": 93_600_000_000, "c_json": '{"a":[1,"x"]}', "c_jsonb": '{"n":7,"ok":true}', "c_bytea": b"\x00\xff",
        "c_ints": [1, None, 3], "c_texts": ["a", "b c"], "c_mood": "vip",
    }


def changeflow(file: Path | None, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    chosen = ["--pipeline", str(file)] if file is not None else []
    return subprocess.run([sys.executable, "-m", "changeflow", *chosen, *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def own_database(live_stack: Settings) -> Iterator[tuple[str, str, str, Settings]]:
    """A database of the test's own with an odd schema name; dropped at the end with the slot."""
    settings = live_stack
    tag = uuid.uuid4().hex[:8]
    database, schema, name = f"cf_own_{tag}", f'Sales "Q" \\{tag}', f"own_{tag}"
    with psycopg.connect(settings.pg_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
    dsn = psycopg.conninfo.make_conninfo(settings.pg_dsn, dbname=database)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            s = sql.Identifier(schema)
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(s))
            conn.execute(sql.SQL("CREATE TYPE {}.{} AS ENUM ('calm', 'vip')").format(s, sql.Identifier("Mood")))
            conn.execute(sql.SQL(EVERY_TYPE).format(s=s, mood=sql.Identifier("Mood")))
            conn.execute(sql.SQL(
                'CREATE TABLE {}."Order Lines" (order_id uuid, "line no" integer, qty numeric(10,3), '
                'note text, PRIMARY KEY (order_id, "line no"))').format(s))
            conn.execute(sql.SQL("CREATE TABLE {}.customers (code text PRIMARY KEY, name text)").format(s))
            conn.execute(sql.SQL('CREATE TABLE {}."audit log" (at timestamptz, what text)').format(s))
            conn.execute(sql.SQL(EVERY_INSERT).format(s=s), {"id": 1, "exact": EXACT, "text": TEXT, "uuid": UID})
            conn.execute(sql.SQL('INSERT INTO {}."Order Lines" VALUES (%s, 1, 2.5, %s), (%s, 2, 1, NULL)').format(s),
                         (UID, "first", UID))
            conn.execute(sql.SQL("INSERT INTO {}.customers VALUES ('C-1', 'Ada'), (%s, 'Bob')").format(s), (ODD_CODE,))
        yield database, schema, name, settings
    finally:
        _drop_everything(settings, database, name)


def read_model_database(name: str) -> str:
    """The second PostgreSQL database the own pipeline also lands in (the PostgreSQL store)."""
    return f"{name}_read"


def postgres_store_rows(settings: Settings, name: str, table: str, order: str) -> list[dict[str, Any]]:
    """The live rows of one entity in the PostgreSQL store, its own columns left out."""
    dsn = psycopg.conninfo.make_conninfo(settings.pg_dsn, dbname=read_model_database(name))
    try:
        with psycopg.connect(dsn) as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
            rows = cur.execute(sql.SQL("SELECT * FROM public.{} WHERE NOT _cf_deleted ORDER BY {}").format(
                sql.Identifier(table), sql.Identifier(order))).fetchall()
    except (psycopg.OperationalError, psycopg.errors.UndefinedTable):  # not set up yet
        return []
    return [{k: v for k, v in row.items() if not k.startswith("_cf_")} for row in rows]


def _drop_everything(settings: Settings, database: str, name: str) -> None:
    from confluent_kafka.admin import AdminClient

    from changeflow.connectors.client import KafkaConnectClient

    client = KafkaConnectClient(settings.connect_url)
    try:
        if f"{name}-postgres" in client.list():
            client.delete(f"{name}-postgres")
    finally:
        client.close()
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    topics = [t for t in admin.list_topics(timeout=10).topics if t.startswith(f"{name}.") or t.startswith(f"{name}-")]
    for future in (admin.delete_topics(topics).values() if topics else []):
        future.result()
    with psycopg.connect(settings.pg_dsn, autocommit=True) as conn:
        deadline = time.monotonic() + 30
        while (row := conn.execute("SELECT active_pid FROM pg_replication_slots WHERE database = %s",
                                   (database,)).fetchone()) is not None:
            if row[0] is not None:
                conn.execute("SELECT pg_terminate_backend(%s)", (row[0],))
            slot = conn.execute("SELECT slot_name FROM pg_replication_slots WHERE database = %s AND NOT active",
                                (database,)).fetchone()
            if slot is not None:
                conn.execute("SELECT pg_drop_replication_slot(%s)", slot)
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database)))
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(read_model_database(name))))
    rds = redis.Redis.from_url(redis_url(settings))
    keys = list(rds.scan_iter(match=f"{name}:*", count=1000))
    if keys:
        rds.delete(*keys)
    httpx.delete(f"{search_url(settings)}/{name}-*", timeout=30)
    ch = client_for(settings)
    try:
        ch.command(f"DROP DATABASE IF EXISTS `{name}`")
    finally:
        ch.close()


@pytest.fixture
def own_worker(own_database: tuple[str, str, str, Settings], tmp_path: Path
               ) -> Iterator[tuple[Pipeline, Path, Settings, str, Callable[[], int]]]:
    """init → check → connectors apply → a worker of the pipeline's own (its own web port and folder)."""
    database, schema, name, settings = own_database
    file = tmp_path / "pipeline.yml"
    dsn = psycopg.conninfo.make_conninfo(settings.pg_dsn, dbname=database)
    result = changeflow(None, "init", "postgres", dsn, "--schema", schema, "--name", name, "-o", str(file))
    assert result.returncode == 0, result.stderr
    assert f"#   {schema}.audit log: no primary key" in file.read_text()
    # The seed's migration check: every entity also lands in a second PostgreSQL database, the service's own.
    document = yaml.safe_load(file.read_text())
    for entity in document["entities"].values():
        entity["stores"]["postgres"] = {"database": read_model_database(name)}
    file.write_text(yaml.safe_dump(document, sort_keys=False, allow_unicode=True))
    result = changeflow(file, "pipeline", "check")
    assert result.returncode == 0, result.stdout + result.stderr
    result = changeflow(file, "connectors", "apply", "--timeout", "150")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "RUNNING" in result.stdout
    env = {**os.environ, "CHANGEFLOW_WORKER_WEB_PORT": str(WEB_PORT), "PYTHONUNBUFFERED": "1"}
    log = (tmp_path / "worker.log").open("w")
    worker = subprocess.Popen([sys.executable, "-m", "changeflow", "--pipeline", str(file), "worker"],
                              cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)

    def stop() -> int:
        return stop_process(worker)

    try:
        eventually(lambda: worker.poll() is None and _answers(WEB_PORT), timeout=120, what="own worker up")
        yield load(file), file, settings, schema, stop
    finally:
        stop()
        log.close()


def _answers(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/", timeout=2).status_code < 500
    except httpx.HTTPError:
        return False


def redis_row(settings: Settings, key: str) -> Any:
    value = redis.Redis.from_url(redis_url(settings)).get(key)
    return None if value is None else json.loads(value)


def search_doc(settings: Settings, index: str, doc_id: str) -> Any:
    response = httpx.get(f"{search_url(settings)}/{index}/_doc/{httpx.URL('x/' + doc_id).raw_path.decode()[2:]}",
                         timeout=10)
    return response.json().get("_source") if response.status_code == 200 else None


def clickhouse_rows(settings: Settings, database: str, table: str, order: str) -> list[dict[str, Any]]:
    ch = client_for(settings)
    try:
        result = ch.query(f"SELECT * EXCEPT (_key, _version, _is_deleted, _ts_ms, _ingested_at) "
                          f"FROM `{database}`.`{table}` FINAL WHERE NOT _is_deleted ORDER BY {order}",
                          column_formats={"c_bytea": "bytes"})
        return [dict(zip(result.column_names, row, strict=True)) for row in result.result_rows]
    finally:
        ch.close()


def test_own_database_reaches_every_store_exactly_and_reconciles(
    own_worker: tuple[Pipeline, Path, Settings, str, Callable[[], int]], pipeline: Settings
) -> None:
    own, file, settings, schema, stop_worker = own_worker
    assert set(own.entities) == {"everything", "order_lines", "customers"}
    every, lines, customers = own.entity("everything"), own.entity("order_lines"), own.entity("customers")

    # The snapshot: every type, exactly, in every store.
    assert eventually(lambda: redis_row(settings, row_key(every, "1")), timeout=120, what="snapshot in redis") \
        == expected_json(1)
    assert eventually(lambda: search_doc(settings, index_name(every), "1"), timeout=60) == expected_json(1)
    rows = eventually(lambda: clickhouse_rows(settings, table_of(every)[0], table_of(every)[1], "id"),
                      timeout=60, what="snapshot in clickhouse")
    assert len(rows) == 1
    assert {k: v for k, v in rows[0].items() if expected_clickhouse(1).get(k, "absent") != v} == {}
    assert set(rows[0]) == set(expected_clickhouse(1))

    # A composite key is one unambiguous text in Redis and search; typed key columns in ClickHouse.
    line_key = f'["{UID}","1"]'  # README "Keys": the JSON array of the values' texts
    assert eventually(lambda: redis_row(settings, row_key(lines, line_key)), timeout=60) == {
        "order_id": str(UID), "line no": 1, "qty": "2.500", "note": "first"}
    assert search_doc(settings, index_name(lines), line_key) == {
        "order_id": str(UID), "line no": 1, "qty": "2.500", "note": "first"}
    assert eventually(lambda: redis_row(settings, row_key(customers, ODD_CODE)), timeout=60) == {
        "code": ODD_CODE, "name": "Bob"}

    # Live changes: insert, update, delete, and a composite-key row moved by an update of its key.
    dsn = own.source_dsn(settings)
    with psycopg.connect(dsn, autocommit=True) as conn:
        s = sql.Identifier(schema)
        conn.execute(sql.SQL(EVERY_INSERT).format(s=s), {"id": 2, "exact": EXACT, "text": "two", "uuid": UID})
        conn.execute(sql.SQL("UPDATE {}.everything SET c_text = %s WHERE id = 1").format(s), ("changed ✓",))
        conn.execute(sql.SQL('UPDATE {}."Order Lines" SET "line no" = 3, note = %s WHERE "line no" = 2').format(s),
                     ("moved",))
        conn.execute(sql.SQL("DELETE FROM {}.customers WHERE code = 'C-1'").format(s))

    assert eventually(lambda: redis_row(settings, row_key(every, "2")), timeout=60) == expected_json(2, "two")
    eventually(lambda: redis_row(settings, row_key(every, "1")) == expected_json(1, "changed ✓"), timeout=60,
               what="update in redis")
    eventually(lambda: search_doc(settings, index_name(every), "1") == expected_json(1, "changed ✓"), timeout=60,
               what="update in search")
    eventually(lambda: clickhouse_rows(settings, table_of(every)[0], table_of(every)[1], "id")
               == [expected_clickhouse(1, "changed ✓"), expected_clickhouse(2, "two")], timeout=60,
               what="insert and update in clickhouse")
    eventually(lambda: redis_row(settings, row_key(customers, "C-1")) is None
               and search_doc(settings, index_name(customers), "C-1") is None, timeout=60, what="delete")
    moved = f'["{UID}","3"]'
    eventually(lambda: redis_row(settings, row_key(lines, moved)) is not None
               and redis_row(settings, row_key(lines, f'["{UID}","2"]')) is None, timeout=60,
               what="key change")
    assert clickhouse_rows(settings, table_of(lines)[0], table_of(lines)[1], "`line no`") == [
        {"order_id": str(UID), "line no": 1, "qty": Decimal("2.500"), "note": "first"},
        {"order_id": str(UID), "line no": 3, "qty": Decimal("1.000"), "note": "moved"}]
    assert clickhouse_rows(settings, table_of(customers)[0], table_of(customers)[1], "code") == [
        {"code": ODD_CODE, "name": "Bob"}]
    # The PostgreSQL store: typed tables, the source's own types and values, the same deletes and key moves.
    eventually(lambda: postgres_store_rows(settings, own.namespace, "customers", "code")
               == [{"code": ODD_CODE, "name": "Bob"}], timeout=60, what="customers in the postgres store")
    eventually(lambda: postgres_store_rows(settings, own.namespace, "order_lines", "line no") == [
        {"order_id": UID, "line no": 1, "qty": Decimal("2.500"), "note": "first"},
        {"order_id": UID, "line no": 3, "qty": Decimal("1.000"), "note": "moved"}], timeout=60,
        what="order lines in the postgres store")
    everything = eventually(lambda: postgres_store_rows(settings, own.namespace, "everything", "id"), timeout=60)
    eventually(lambda: [r["id"] for r in postgres_store_rows(settings, own.namespace, "everything", "id")]
               == [1, 2] and postgres_store_rows(settings, own.namespace, "everything", "id")[0]["c_text"]
               == "changed ✓", timeout=60, what="everything in the postgres store")
    everything = postgres_store_rows(settings, own.namespace, "everything", "id")
    assert {k: everything[0][k] for k in ("c_num", "c_exact", "c_text", "c_ints", "c_texts", "c_jsonb", "c_bytea",
                                          "c_interval", "c_uuid", "c_date")} == {
        "c_num": Decimal("123456789.123"), "c_exact": EXACT, "c_text": "changed ✓", "c_ints": [1, None, 3],
        "c_texts": ["a", "b c"], "c_jsonb": {"n": 7, "ok": True}, "c_bytea": b"\x00\xff",
        "c_interval": 93_600_000_000, "c_uuid": UID, "c_date": date(1969, 12, 31)}

    # The catalog's types are the ones Connect sends: each entity has its first schema version only.
    versions = read_versions(settings.kafka_bootstrap, own.schema_topic)
    assert sorted((v.entity, v.version) for v in versions) == [("customers", 1), ("everything", 1),
                                                               ("order_lines", 1)]

    # Zero drift in every store for every entity; commerce's pipeline untouched beside it.
    result = changeflow(file, "reconcile", "--full", "--format", "json")
    report = json.loads(result.stdout)
    assert result.returncode == 0, [(r["store"], r["entity"], r["diffs"][:3], r["error"]) for r in report["results"]
                                    if r["drift"] or r["error"]]
    checked = {(r["entity"], r["store"]) for r in report["results"]}
    assert checked == {(e, s) for e in own.entities for s in ("redis", "search", "clickhouse", "postgres")}, report
    assert all(r["drift"] == 0 and r["error"] is None and r["source_count"] == r["store_count"]
               for r in report["results"]), report
    assert not report["skipped"], report
    drift = changeflow(file, "report", "drift", "--format", "json")
    assert drift.returncode == 0, drift.stdout + drift.stderr
    assert {r["entity"]: r["source"] for r in json.loads(drift.stdout)} == {
        "everything": 2, "order_lines": 2, "customers": 1}

    # connectors delete --purge: the worker stopped first (refused while it runs), then nothing is left.
    refused = changeflow(file, "connectors", "delete", "--yes", "--purge")
    assert refused.returncode == 1 and "is running" in refused.stderr and "nothing was removed" in refused.stderr
    assert stop_worker() == 0
    purged = changeflow(file, "connectors", "delete", "--yes", "--purge")
    assert purged.returncode == 0, purged.stdout + purged.stderr
    assert f"clickhouse: database {own.namespace} dropped" in purged.stdout
    assert f"postgres: table {read_model_database(own.namespace)}.public.everything dropped" in purged.stdout
    assert postgres_store_rows(settings, own.namespace, "everything", "id") == []
    assert f"search: index {index_name(every)}-000001 deleted" in purged.stdout
    assert f"kafka: topic {own.schema_topic} deleted" in purged.stdout
    assert f"connector {own.connector_name('postgres')}: offsets deleted" in purged.stdout
    assert not list(redis.Redis.from_url(redis_url(settings)).scan_iter(match=f"{own.namespace}:*"))
    assert httpx.get(f"{search_url(settings)}/_cat/indices/{own.namespace}-*?format=json", timeout=10).json() == []
    ch = client_for(settings)
    try:
        assert ch.command("SELECT count() FROM system.databases WHERE name = {db:String}",
                          parameters={"db": own.namespace}) == 0
    finally:
        ch.close()
    from confluent_kafka.admin import AdminClient

    topics = AdminClient({"bootstrap.servers": settings.kafka_bootstrap}).list_topics(timeout=10).topics
    assert not [t for t in topics if t.startswith(f"{own.namespace}.")], topics
    with psycopg.connect(settings.pg_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s",
                            (own.slot,)).fetchone() == (0,)
    again = changeflow(file, "connectors", "delete", "--yes", "--purge")
    assert again.returncode == 0 and "nothing to remove" in again.stdout, again.stdout + again.stderr

    # Created again under the same names, the pipeline snapshots from the start: the connector's old offsets
    # went with the purge, so the purged stores get every row back.
    result = changeflow(file, "connectors", "apply", "--timeout", "150")
    assert result.returncode == 0, result.stdout + result.stderr
    env = {**os.environ, "CHANGEFLOW_WORKER_WEB_PORT": str(WEB_PORT), "PYTHONUNBUFFERED": "1"}
    with (file.parent / "worker-again.log").open("wb") as log:
        worker = subprocess.Popen([sys.executable, "-m", "changeflow", "--pipeline", str(file), "worker"],
                                  cwd=file.parent, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        assert eventually(lambda: redis_row(settings, row_key(every, "1")), timeout=150,
                          what="row 1 snapshotted again") == expected_json(1, "changed ✓")
        eventually(lambda: redis_row(settings, row_key(customers, ODD_CODE)) is not None, timeout=60,
                   what="customers snapshotted again")
    finally:
        stop_process(worker)
