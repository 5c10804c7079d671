"""Derived stores converge and stay converged: stale records, store outages, full replays."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx
import psycopg
import pytest
import redis

from changeflow.deploy.clickhouse import ClickHouseService
from changeflow.deploy.redis import RedisService
from changeflow.deploy.search_engine import SearchEngineService
from changeflow.deploy.service import Service
from changeflow.deploy.worker import WorkerService
from changeflow.pipelines.spec import Pipeline
from changeflow.reports.drift import drift
from changeflow.reports.status import collect
from changeflow.schemas import SchemaVersion
from changeflow.schemas.book import schema_book
from changeflow.settings import Settings
from changeflow.sinks.clickhouse import ClickHouseStore, client_for, table_of
from changeflow.sinks.redis import key_prefix, row_key
from changeflow.sinks.search import SearchStore, index_name
from changeflow.streams.records import ChangeRecord
from tests.integration.conftest import eventually, redis_url, search_url

pytestmark = pytest.mark.integration


def changeflow(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "changeflow", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture
def pg(pipeline: Settings) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(pipeline.pg_dsn, autocommit=True) as conn:
        yield conn


def product(sv: SchemaVersion, key: str, version: int, name: str, op: str = "u") -> ChangeRecord:
    after = None if op == "d" else {"id": int(key), "sku": f"STALE-{key}", "name": name, "price": Decimal("1.00")}
    return ChangeRecord("postgres", "products", key, op, version, 0, {"id": int(key)}, after,  # type: ignore[arg-type]
                        key_columns=sv.key_columns, types=sv.columns, schema=sv)


def test_stale_records_change_nothing_in_search_and_clickhouse(pipeline: Settings, commerce: Pipeline) -> None:
    key = str(8_000_000_000 + int(time.time() * 1000) % 1_000_000)
    # The products schema the decode stage generated from the source (the worker has published it).
    sv = schema_book(pipeline, commerce, writer=False).latest["products"]
    search, ch = SearchStore(pipeline, commerce), ClickHouseStore(pipeline, commerce)
    client = client_for(pipeline)
    try:
        for sink in (search, ch):
            sink.write_batch([product(sv, key, 200, "new")])
            sink.write_batch([product(sv, key, 100, "old")])  # an older record arrives late
        doc = httpx.get(f"{search_url(pipeline)}/products/_doc/{key}", timeout=5).json()
        assert doc["_source"]["name"] == "new" and doc["_version"] == 200
        rows = client.query("SELECT name, _version FROM changeflow.products FINAL WHERE id = {k:Int64}",
                            parameters={"k": int(key)}).result_rows
        assert rows == [("new", 200)]
        for sink in (search, ch):
            sink.write_batch([product(sv, key, 300, "", op="d")])
            sink.write_batch([product(sv, key, 250, "resurrected")])  # older than the delete
        assert httpx.get(f"{search_url(pipeline)}/products/_doc/{key}", timeout=5).status_code == 404
        assert client.query("SELECT count() FROM changeflow.products FINAL WHERE id = {k:Int64}",
                            parameters={"k": int(key)}).result_rows == [(0,)]
    finally:
        client.command("ALTER TABLE changeflow.products DELETE WHERE id = {k:Int64}", parameters={"k": int(key)})
        client.command("ALTER TABLE changeflow.changelog DELETE WHERE key = {k:String}", parameters={"k": key})
        client.close()
        search.close()
        ch.close()


def sink_status(settings: Settings, p: Pipeline, name: str) -> Any:
    return next(s for s in collect(settings, p).sinks if s.name == name)


@pytest.mark.parametrize(
    ("sink", "service_cls"),
    [("redis", RedisService), ("search", SearchEngineService), ("clickhouse", ClickHouseService)],
)
def test_a_stopped_store_holds_its_sink_and_catches_up_without_loss(
    pipeline: Settings, commerce: Pipeline, pg: psycopg.Connection[Any], sku_prefix: str, sink: str,
    service_cls: type[Service],
) -> None:
    service = service_cls(pipeline)
    service.stop()
    try:
        pg.execute(
            "INSERT INTO products (sku, name, price_cents, stock) "
            "SELECT %s || '-' || g, 'outage ' || g, 100 * g, g FROM generate_series(1, 50) g",
            (sku_prefix,),
        )
        pg.execute("UPDATE products SET price_cents = price_cents + 1 WHERE sku LIKE %s", (f"{sku_prefix}-%",))
        pg.execute("DELETE FROM products WHERE sku IN (%s, %s)", (f"{sku_prefix}-1", f"{sku_prefix}-2"))
        # While the store is down: that sink fails and lags; the others are not held back.
        failing = eventually(
            lambda: (s := sink_status(pipeline, commerce, sink)) and s.healthy is False and (s.lag or 0) > 0 and s,
            timeout=60, what=f"{sink} reported failing with lag",
        )
        assert failing.last_error
        others = [s for s in ("redis", "search", "clickhouse") if s != sink]
        eventually(lambda: all(sink_status(pipeline, commerce, o).lag == 0 for o in others), timeout=60,
                   what="other sinks caught up")
        result = changeflow("status", "--json")
        assert result.returncode == 1
        reported = {s["name"]: s for s in json.loads(result.stdout)["sinks"]}
        assert reported[sink]["healthy"] is False and reported[sink]["lag"] > 0
    finally:
        service.start()
        service.wait_healthy(120)
    eventually(lambda: sink_status(pipeline, commerce, sink).healthy and sink_status(pipeline, commerce, sink).lag == 0,
               timeout=120, what=f"{sink} caught up")
    rows = eventually(lambda: (r := drift(pipeline, commerce)) and all(x.drift == 0 for x in r) and r, timeout=60,
                      what="zero drift")
    assert all(r.drift == 0 for r in rows)
    ids = [r[0] for r in pg.execute("SELECT id FROM products WHERE sku LIKE %s", (f"{sku_prefix}-%",)).fetchall()]
    assert len(ids) == 48
    if sink == "redis":
        rds = redis.Redis.from_url(redis_url(pipeline), decode_responses=True)
        values = rds.mget([row_key(commerce.entities["products"], str(i)) for i in ids])
        assert all(v is not None and json.loads(v)["name"].startswith("outage ") for v in values)
    pg.execute("DELETE FROM products WHERE sku LIKE %s", (f"{sku_prefix}-%",))


def store_state(settings: Settings, p: Pipeline) -> dict[str, Any]:
    rds = redis.Redis.from_url(redis_url(settings), decode_responses=True)
    products, orders = p.entities["products"], p.entities["orders"]
    keys = (sorted(rds.scan_iter(match=f"{key_prefix(products)}:*", count=1000))
            + sorted(rds.scan_iter(match=f"{key_prefix(orders)}:*", count=1000)))
    client = client_for(settings)
    try:
        ch_rows = client.query(
            "SELECT id, sku, name, description, category, price, stock, _version "
            f"FROM {table_of(products)[0]}.{table_of(products)[1]} FINAL ORDER BY id"
        ).result_rows
        ch_orders = client.query("SELECT id, status, total_amount, _version "
                                 f"FROM {table_of(orders)[0]}.{table_of(orders)[1]} FINAL ORDER BY id"
                                 ).result_rows
    finally:
        client.close()
    indexes = f"{index_name(products)},{index_name(orders)}"
    httpx.post(f"{search_url(settings)}/{indexes}/_refresh", timeout=10)
    hits = httpx.post(f"{search_url(settings)}/{indexes}/_search",
                      json={"size": 10000, "version": True, "sort": ["_doc"]}, timeout=30).json()["hits"]["hits"]
    return {
        "redis": {k: rds.get(k) for k in keys},
        "redis_versions": rds.hgetall(f"{p.namespace}:versions"),
        "clickhouse": ch_rows + ch_orders,
        "search": sorted((h["_index"], h["_id"], h["_version"], json.dumps(h["_source"], sort_keys=True))
                         for h in hits),
    }


def test_full_replay_from_earliest_leaves_every_store_exactly_as_it_was(
    pipeline: Settings, commerce: Pipeline, sku_prefix: str
) -> None:
    worker = WorkerService(pipeline)
    # History of our own to replay: inserts, updates and deletes (older records the guards must refuse).
    with psycopg.connect(pipeline.pg_dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO products (sku, name, price_cents, stock) "
            "SELECT %s || '-' || g, 'replay ' || g, 100 * g, g FROM generate_series(1, 30) g",
            (sku_prefix,),
        )
        conn.execute("UPDATE products SET price_cents = price_cents + 5 WHERE sku LIKE %s", (f"{sku_prefix}-%",))
        conn.execute("DELETE FROM products WHERE sku IN (%s, %s, %s)",
                     (f"{sku_prefix}-1", f"{sku_prefix}-2", f"{sku_prefix}-3"))

    def quiet() -> bool:
        status = collect(pipeline, commerce)
        return status.stream_lag == 0 and all(s.lag == 0 for s in status.sinks)

    eventually(quiet, timeout=60, what="stream and sinks idle")
    # Changes of earlier tests may still be on their way from the WAL: wait until the stores stop moving.
    eventually(lambda: (a := store_state(pipeline, commerce)) == (time.sleep(2) or store_state(pipeline, commerce))
               and quiet() and a,
               timeout=90, interval=0, what="stores stable")
    worker.stop()
    try:
        before = store_state(pipeline, commerce)
        assert before["redis"] and before["clickhouse"] and before["search"]
        result = changeflow("sinks", "reset", "all", "--to-earliest")
        assert result.returncode == 0, result.stderr
        assert "records will be replayed" in result.stdout
        lags = {s.name: s.lag for s in collect(pipeline, commerce).sinks}
        assert all((lag or 0) > 0 for lag in lags.values()), lags
    finally:
        worker.start()
        worker.wait_healthy(120)
    eventually(lambda: all(s.lag == 0 for s in collect(pipeline, commerce).sinks), timeout=300, what="replay finished")
    after = store_state(pipeline, commerce)
    assert len([k for k in after["redis"] if k.startswith("product:")]) >= 27
    assert after == before
    with psycopg.connect(pipeline.pg_dsn, autocommit=True) as conn:
        conn.execute("DELETE FROM products WHERE sku LIKE %s", (f"{sku_prefix}-%",))


def test_reset_refuses_while_the_worker_runs(pipeline: Settings) -> None:
    result = changeflow("sinks", "reset", "redis", "--to-earliest")
    assert result.returncode == 1
    assert "a worker is consuming, nothing was reset: changeflow-sink-redis (1 member(s)" in result.stderr
    assert "%6|" not in result.stderr  # no librdkafka chatter on an operator's terminal
