"""A database as its owners run it (issue 24), end to end on the real stack.

Its biggest tables are partitioned: ``payments`` by RANGE of its timestamp, with a DEFAULT partition, and
``refunds`` by LIST of its reason. ``orders`` has a ``text[]`` column that is NULL in one row and empty in
another. The publication already exists without ``publish_via_partition_root``, as a DBA would have made it.

The user's path, in the user's order: ``CHANGEFLOW_PIPELINE`` set first, then ``init`` writes that very
file; ``pipeline check`` refuses the publication (and an entity naming a partition) with the fix;
``connectors apply`` says what it changed; a worker of the pipeline's own runs it. Rows then move between
partitions (an UPDATE of the partition key), land in the DEFAULT partition, a partition is created, one
attached and one detached while the worker runs: every change reaches every store, exactly. The report
views and tables are there before any report command ran; a table created afterwards is listed as not
captured by ``pipeline check`` and ``status``; ``reconcile --full`` is clean, NULL arrays included.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import redis
from clickhouse_connect.driver.exceptions import DatabaseError
from psycopg import sql

from changeflow.pipelines.load import load
from changeflow.pipelines.spec import EntitySpec
from changeflow.settings import Settings
from changeflow.sinks.base import create
from changeflow.sinks.clickhouse import client_for, table_of
from changeflow.sinks.redis import key_prefix
from changeflow.sinks.search import index_name
from tests.integration.conftest import eventually, redis_url, search_url, stop_process
from tests.integration.test_own_database import _answers, _drop_everything

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
WEB_PORT = 6171
ORDER_A, ORDER_B, ORDER_C = (uuid.UUID(f"00000000-0000-4000-8000-00000000000{i}") for i in (1, 2, 3))
PAY_JAN, PAY_FEB, PAY_LATE, PAY_MOVED = (uuid.UUID(f"00000000-0000-4000-9000-00000000000{i}") for i in (1, 2, 3, 4))
REFUND_1, REFUND_2 = (uuid.UUID(f"00000000-0000-4000-a000-00000000000{i}") for i in (1, 2))

SCHEMA = """
CREATE TABLE orders (
    id uuid PRIMARY KEY, user_id text NOT NULL, status text NOT NULL, total_amount numeric(12, 2) NOT NULL,
    items jsonb NOT NULL DEFAULT '[]', created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(), tags text[]
);
CREATE TABLE payments (
    id uuid NOT NULL, order_id uuid NOT NULL, amount numeric(12, 2) NOT NULL, status text NOT NULL,
    provider_ref text, created_at timestamptz NOT NULL, PRIMARY KEY (id, created_at)
) PARTITION BY RANGE (created_at);
CREATE TABLE payments_2026_01 PARTITION OF payments FOR VALUES FROM ('2026-01-01') TO ('2026-02-01');
CREATE TABLE payments_2026_02 PARTITION OF payments FOR VALUES FROM ('2026-02-01') TO ('2026-03-01');
CREATE TABLE payments_default PARTITION OF payments DEFAULT;
CREATE TABLE refunds (
    id uuid NOT NULL, payment_id uuid NOT NULL, order_id uuid NOT NULL, amount numeric(12, 2) NOT NULL,
    reason text NOT NULL, created_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (id, reason)
) PARTITION BY LIST (reason);
CREATE TABLE refunds_damaged PARTITION OF refunds FOR VALUES IN ('damaged');
CREATE TABLE refunds_other PARTITION OF refunds DEFAULT;
CREATE TABLE clashing (
    id integer PRIMARY KEY, "_key" text, "_version" bigint, "_is_deleted" boolean, "_ingested_at" text,
    "_id" text, "_source" text, "_index" integer, "_cf_key" text, "_changeflow_key" text, "_version_" integer
);
"""
# Issue 20 §5: columns named like every store's own (ClickHouse's meta columns, the search engine's metadata
# fields, the PostgreSQL store's), and one named like an escaped form.
CLASHING_ROW = {"id": 1, "_key": "k", "_version": 7, "_is_deleted": True, "_ingested_at": "then", "_id": "i",
                "_source": "s", "_index": 3, "_cf_key": "c", "_changeflow_key": "x", "_version_": 8}


def run(file: Path | None, *argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    chosen = ["--pipeline", str(file)] if file is not None else []
    return subprocess.run([sys.executable, "-m", "changeflow", *chosen, *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, **(env or {})})


def redis_rows(settings: Settings, spec: EntitySpec) -> dict[str, Any]:
    """Every row of the entity in Redis, by its ``id`` column."""
    client = redis.Redis.from_url(redis_url(settings))
    rows = [json.loads(v) for k in client.scan_iter(match=f"{key_prefix(spec)}:*", count=1000)
            if (v := client.get(k)) is not None]
    return {row["id"]: row for row in rows}


def search_rows(settings: Settings, spec: EntitySpec) -> dict[str, Any]:
    httpx.post(f"{search_url(settings)}/{index_name(spec)}/_refresh", timeout=30)
    response = httpx.get(f"{search_url(settings)}/{index_name(spec)}/_search", params={"size": 100}, timeout=30)
    if response.status_code != 200:  # the index is made (and its shard started) when the first record lands
        return {}
    return {hit["_source"]["id"]: hit["_source"] for hit in response.json()["hits"]["hits"]}


def clickhouse_rows(settings: Settings, spec: EntitySpec) -> dict[str, Any]:
    client = client_for(settings)
    try:
        try:
            result = client.query(f"SELECT * EXCEPT (_key, _version, _is_deleted, _ts_ms, _ingested_at) FROM "
                                  f"`{table_of(spec)[0]}`.`{table_of(spec)[1]}` FINAL WHERE NOT _is_deleted")
        except DatabaseError as exc:  # before the sink has set up: no database or table yet
            if "UNKNOWN_DATABASE" in str(exc) or "UNKNOWN_TABLE" in str(exc):
                return {}
            raise
        return {str(row[0]): dict(zip(result.column_names, row, strict=True)) for row in result.result_rows}
    finally:
        client.close()


def ids_in_every_store(settings: Settings, spec: EntitySpec) -> dict[str, set[str]]:
    return {"redis": set(redis_rows(settings, spec)), "search": set(search_rows(settings, spec)),
            "clickhouse": set(clickhouse_rows(settings, spec))}


@pytest.fixture
def partitioned_database(live_stack: Settings) -> Iterator[tuple[str, str, Settings]]:
    settings = live_stack
    tag = uuid.uuid4().hex[:8]
    database, name = f"cf_parts_{tag}", f"parts_{tag}"
    with psycopg.connect(settings.pg_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
    dsn = psycopg.conninfo.make_conninfo(settings.pg_dsn, dbname=database)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(SCHEMA)
            conn.execute("INSERT INTO orders (id, user_id, status, total_amount, tags) VALUES "
                         "(%s, 'u1', 'paid', 100.00, NULL), (%s, 'u2', 'paid', 50.00, '{}'), "
                         "(%s, 'u3', 'pending', 20.00, '{a,\"b c\"}')", (ORDER_A, ORDER_B, ORDER_C))
            conn.execute("INSERT INTO payments VALUES (%s, %s, 90.00, 'captured', NULL, '2026-01-15 10:00+00'), "
                         "(%s, %s, 50.00, 'captured', 'r-2', '2026-02-15 10:00+00')",
                         (PAY_JAN, ORDER_A, PAY_FEB, ORDER_B))
            conn.execute("INSERT INTO refunds (id, payment_id, order_id, amount, reason) VALUES "
                         "(%s, %s, %s, 5.00, 'damaged')", (REFUND_1, PAY_FEB, ORDER_B))
            conn.execute(sql.SQL("INSERT INTO clashing ({}) VALUES ({})").format(
                sql.SQL(", ").join(map(sql.Identifier, CLASHING_ROW)),
                sql.SQL(", ").join(sql.Placeholder() * len(CLASHING_ROW))), list(CLASHING_ROW.values()))
        yield database, name, settings
    finally:
        _drop_everything(settings, database, name)


def test_partitioned_tables_null_arrays_reports_and_late_tables_on_a_real_database(
    partitioned_database: tuple[str, str, Settings], pipeline: Settings, tmp_path: Path
) -> None:
    database, name, settings = partitioned_database
    dsn = psycopg.conninfo.make_conninfo(settings.pg_dsn, dbname=database)
    file = tmp_path / "pipeline.yml"

    # init with CHANGEFLOW_PIPELINE already naming the file it writes: it never reads it.
    result = run(None, "init", "postgres", dsn, "--name", name, "-o", str(file),
                 env={"CHANGEFLOW_PIPELINE": str(file)})
    assert result.returncode == 0, result.stderr
    own = load(file)
    # The partitioned tables are one entity each; their partitions are none.
    assert {n: e.qualified_table for n, e in own.entities.items()} == {
        "orders": "public.orders", "payments": "public.payments", "refunds": "public.refunds",
        "clashing": "public.clashing"}
    assert "payments_2026_01" not in file.read_text() and "refunds_damaged" not in file.read_text()

    # A publication made by hand, the way it was before: partitions' changes under their own names.
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE PUBLICATION {} FOR TABLE orders, payments, refunds").format(
            sql.Identifier(own.publication)))
    result = run(file, "pipeline", "check")
    assert result.returncode == 1, result.stdout + result.stderr
    assert (f"{file}: entities.payments.table: public.payments is partitioned and publication {own.publication} "
            "publishes its partitions' changes under their own names, which the connector drops (every change "
            "after the snapshot lost); run `changeflow connectors apply` (it sets publish_via_partition_root = "
            f"true), or ALTER PUBLICATION {own.publication} SET (publish_via_partition_root = true)"
            ) in result.stdout
    assert "entities.refunds.table: public.refunds is partitioned" in result.stdout
    assert "entities.orders" not in result.stdout and "entities.clashing" not in result.stdout

    # An entity naming a partition instead of its root is refused with the fix.
    partition_file = tmp_path / "partition.yml"
    partition_file.write_text(file.read_text().replace("table: public.payments\n", "table: public.payments_2026_01\n"))
    result = run(partition_file, "pipeline", "check")
    assert result.returncode == 1
    assert ("entities.payments.table: public.payments_2026_01 is a partition of public.payments: its changes are "
            "published under public.payments's name, so this entity would get none after the snapshot; capture "
            "the partitioned table itself: `table: public.payments`") in result.stdout

    # connectors apply turns publish_via_partition_root on and says so.
    result = run(file, "connectors", "apply", "--timeout", "150")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"publication {own.publication}: publish_via_partition_root turned on" in result.stdout
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT pubviaroot FROM pg_publication WHERE pubname = %s",
                            (own.publication,)).fetchone() == (True,)
    result = run(file, "pipeline", "check")
    assert result.returncode == 0, result.stdout + result.stderr

    env = {**os.environ, "CHANGEFLOW_WORKER_WEB_PORT": str(WEB_PORT), "PYTHONUNBUFFERED": "1"}
    log = (tmp_path / "worker.log").open("w")
    worker = subprocess.Popen([sys.executable, "-m", "changeflow", "--pipeline", str(file), "worker"],
                              cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        eventually(lambda: worker.poll() is None and _answers(WEB_PORT), timeout=120, what="worker up")
        orders, payments, refunds = own.entity("orders"), own.entity("payments"), own.entity("refunds")
        a, b, c = str(ORDER_A), str(ORDER_B), str(ORDER_C)
        jan, feb, late, moved = str(PAY_JAN), str(PAY_FEB), str(PAY_LATE), str(PAY_MOVED)

        # The snapshot, read through the roots.
        every = {"redis": {jan, feb}, "search": {jan, feb}, "clickhouse": {jan, feb}}
        eventually(lambda: ids_in_every_store(settings, payments) == every, timeout=150, what="payments snapshot")
        eventually(lambda: ids_in_every_store(settings, refunds)["clickhouse"] == {str(REFUND_1)}, timeout=60)
        # Columns named like the stores' own land under their own names in each store.
        clashing = own.entity("clashing")
        eventually(lambda: redis_rows(settings, clashing).get(1) == CLASHING_ROW, timeout=60, what="clashing, redis")
        for store_name in ("search", "clickhouse"):
            store = create(store_name, settings, own)
            try:
                eventually(lambda s=store: (v := s.fetch(clashing, ["1"]).get("1")) is not None
                           and v.row == CLASHING_ROW, timeout=60, what=f"clashing, {store_name}")
            finally:
                store.close()
        client = client_for(settings)
        try:  # stored with one more `_` each: ClickHouse's own columns are there beside them
            stored = {n for (n,) in client.query(f"SELECT name FROM system.columns WHERE database = '{name}' "
                                                  "AND table = 'clashing'").result_rows}
            assert {"_key", "_key_", "_version", "_version_", "_version__", "_ingested_at_", "_id"} <= stored
        finally:
            client.close()

        # The report views and tables exist before any report command ran (the views over this pipeline's
        # orders, payments and refunds; reconcile's history, still empty).
        client = client_for(settings)
        try:
            assert client.command(f"SELECT count() FROM `{name}`.reconciliation_runs") == 0
            assert client.command(f"SELECT count() FROM `{name}`.reconciliation_diffs") == 0
            exceptions = eventually(lambda: client.query(
                f"SELECT kind, order_id, expected, actual FROM `{name}`.finance_exceptions").result_rows,
                timeout=60, what="the planted payment mismatch past the grace window")
            assert exceptions == [("payment_mismatch", a, Decimal("100.00"), Decimal("90.00"))]
        finally:
            client.close()

        with psycopg.connect(dsn, autocommit=True) as conn:
            # Into the DEFAULT partition, through the root.
            conn.execute("INSERT INTO payments VALUES (%s, %s, 10.00, 'captured', NULL, '2030-06-01 00:00+00')",
                         (PAY_LATE, ORDER_C))
            # A partition created, another attached, while the worker runs; rows land in both.
            conn.execute("CREATE TABLE payments_2026_03 PARTITION OF payments "
                         "FOR VALUES FROM ('2026-03-01') TO ('2026-04-01')")
            # Moved between range partitions (Jan → the new Mar) and between list partitions (damaged → default).
            conn.execute("UPDATE payments SET created_at = '2026-03-20 12:00+00', provider_ref = 'moved' "
                         "WHERE id = %s", (PAY_JAN,))
            conn.execute("INSERT INTO refunds (id, payment_id, order_id, amount, reason) VALUES "
                         "(%s, %s, %s, 1.50, 'damaged')", (REFUND_2, PAY_FEB, ORDER_B))
            conn.execute("UPDATE refunds SET reason = 'late' WHERE id = %s", (REFUND_1,))
            conn.execute("CREATE TABLE payments_2026_04 (LIKE payments INCLUDING ALL)")
            conn.execute("ALTER TABLE payments ATTACH PARTITION payments_2026_04 "
                         "FOR VALUES FROM ('2026-04-01') TO ('2026-05-01')")
            conn.execute("INSERT INTO payments VALUES (%s, %s, 7.00, 'captured', 'mar', '2026-03-03 00:00+00'), "
                         "(gen_random_uuid(), %s, 8.00, 'failed', 'apr', '2026-04-04 00:00+00')",
                         (PAY_MOVED, ORDER_C, ORDER_C))
            # A partition emptied, then detached: later changes to the others still flow.
            conn.execute("DELETE FROM payments WHERE created_at >= '2026-02-01' AND created_at < '2026-03-01' "
                         "AND id = %s", (PAY_FEB,))
            conn.execute("UPDATE orders SET tags = '{}' WHERE id = %s", (ORDER_C,))
            conn.execute("INSERT INTO orders (id, user_id, status, total_amount) VALUES "
                         "('00000000-0000-4000-8000-000000000009', 'u9', 'pending', 1.00)")

        def payment_ids() -> dict[str, set[str]]:
            return ids_in_every_store(settings, payments)

        april = eventually(lambda: {i for i, r in redis_rows(settings, payments).items() if r["provider_ref"] == "apr"},
                           timeout=60, what="the attached partition's row")
        expected = {jan, late, moved, *april}
        eventually(lambda: payment_ids() == {"redis": expected, "search": expected, "clickhouse": expected},
                   timeout=90, what="payments in every store after moves, attach and delete")
        assert redis_rows(settings, payments)[jan] == {
            "id": jan, "order_id": a, "amount": "90.00", "status": "captured", "provider_ref": "moved",
            "created_at": "2026-03-20T12:00:00+00:00"}
        assert search_rows(settings, payments)[late]["created_at"] == "2030-06-01T00:00:00+00:00"
        ch = clickhouse_rows(settings, payments)
        assert ch[jan]["created_at"] == datetime(2026, 3, 20, 12) and ch[jan]["amount"] == Decimal("90.00")
        assert ch[moved]["provider_ref"] == "mar"
        eventually(lambda: {i: r["reason"] for i, r in redis_rows(settings, refunds).items()}
                   == {str(REFUND_1): "late", str(REFUND_2): "damaged"}, timeout=60, what="refund moved")
        eventually(lambda: {i: r["reason"] for i, r in clickhouse_rows(settings, refunds).items()}
                   == {str(REFUND_1): "late", str(REFUND_2): "damaged"}, timeout=60, what="refund moved (clickhouse)")

        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("ALTER TABLE payments DETACH PARTITION payments_2026_02")
            conn.execute("UPDATE payments SET status = 'refunded' WHERE id = %s", (PAY_MOVED,))
            conn.execute("CREATE TABLE late_table (code text PRIMARY KEY)")
        eventually(lambda: redis_rows(settings, payments)[moved]["status"] == "refunded"
                   and clickhouse_rows(settings, payments)[moved]["status"] == "refunded", timeout=60,
                   what="a change after the detach")

        # NULL and empty arrays: the JSON stores keep them apart; ClickHouse holds [] for both.
        eventually(lambda: {k: r["tags"] for k, r in redis_rows(settings, orders).items() if k in (a, b, c)}
                   == {a: None, b: [], c: []}, timeout=60, what="tags in redis")
        assert {k: r["tags"] for k, r in search_rows(settings, orders).items() if k in (a, b, c)} == {
            a: None, b: [], c: []}
        assert {k: r["tags"] for k, r in clickhouse_rows(settings, orders).items() if k in (a, b, c)} == {
            a: [], b: [], c: []}

        # Tables nobody captures are said: one created afterwards, and the detached partition.
        result = run(file, "pipeline", "check")
        assert result.returncode == 0, result.stdout + result.stderr
        assert "2 table(s) not captured by any entity" in result.stderr
        assert "  not captured: public.late_table" in result.stderr
        assert "  not captured: public.payments_2026_02" in result.stderr
        status = json.loads(run(file, "status", "--json", env={"CHANGEFLOW_WORKER_WEB_PORT": str(WEB_PORT)}).stdout)
        assert status["not_captured"] == ["public.late_table", "public.payments_2026_02"]
        assert status["worker"] and {s["name"]: s["healthy"] for s in status["sinks"]} == {
            "redis": True, "search": True, "clickhouse": True}
        # Asked at the commerce worker's port, status does not take that worker's sinks for this pipeline's.
        elsewhere = json.loads(run(file, "status", "--json").stdout)
        assert not elsewhere["worker"] and all(s["healthy"] is None for s in elsewhere["sinks"])
        assert (f"the worker on port {settings.worker_web_port} runs another pipeline; set CHANGEFLOW_WORKER_WEB_PORT "
                f"to the port of pipeline {name}'s worker") in elsewhere["errors"]

        # Nothing lost, and nothing a store cannot represent called drift.
        result = run(file, "reconcile", "--full", "--format", "json")
        report = json.loads(result.stdout)
        assert result.returncode == 0, json.dumps([(r["store"], r["entity"], r["diffs"][:3], r["error"])
                                                   for r in report["results"] if r["drift"] or r["error"]])
        assert {(r["entity"], r["store"]) for r in report["results"]} == {
            (e, s) for e in own.entities for s in ("redis", "search", "clickhouse")}
        assert {r["entity"]: r["source_count"] for r in report["results"]} == {
            "orders": 4, "payments": 4, "refunds": 2, "clashing": 1}
    finally:
        stop_process(worker)
        log.close()
