"""Several workers split the partitions and survive SIGKILL; heartbeats keep the slot advancing."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from decimal import Decimal
from typing import Any

import httpx
import psycopg
import pytest
import redis
from confluent_kafka.admin import AdminClient

from changeflow.deploy.worker import WorkerService
from changeflow.pipelines.spec import Pipeline
from changeflow.reports.status import collect
from changeflow.settings import Settings
from changeflow.sinks.clickhouse import client_for
from tests.integration.conftest import eventually, redis_url, search_url

pytestmark = pytest.mark.integration


def members(settings: Settings, group: str) -> int:
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    return len(admin.describe_consumer_groups([group])[group].result().members)


def test_two_workers_split_partitions_and_a_sigkilled_one_loses_nothing(
    pipeline: Settings, commerce: Pipeline, sku_prefix: str
) -> None:
    first, second = WorkerService(pipeline), WorkerService(pipeline, instance=2)
    second.start()
    try:
        second.wait_healthy(120)
        groups = (commerce.decode_group, *(commerce.sink_group(s) for s in ("redis", "search", "clickhouse")))
        for group in groups:
            eventually(lambda g=group: members(pipeline, g) == 2, timeout=60, what=f"{group} has two members")

        stop = threading.Event()
        written: list[int] = []

        def load() -> None:
            with psycopg.connect(pipeline.pg_dsn, autocommit=True) as conn:
                i = 0
                while not stop.is_set() and i < 400:
                    i += 1
                    row = conn.execute(
                        "INSERT INTO products (sku, name, price_cents, stock) VALUES (%s, 'scale', %s, 1) RETURNING id",
                        (f"{sku_prefix}-{i}", 100 + i),
                    ).fetchone()
                    assert row is not None
                    written.append(int(row[0]))
                    if i % 3 == 0:
                        conn.execute("UPDATE products SET price_cents = price_cents + 1 WHERE id = %s", (row[0],))
                    time.sleep(0.005)

        writer = threading.Thread(target=load)
        writer.start()
        time.sleep(1.0)
        pid = first.pid()
        assert pid is not None
        os.killpg(pid, signal.SIGKILL)  # mid-batch: no shutdown, no final commit
        writer.join(timeout=120)
        stop.set()
        assert len(written) == 400
        # The survivor takes every partition and every store converges on the exact rows.
        eventually(lambda: members(pipeline, commerce.sink_group("redis")) == 1, timeout=60,
                   what="rebalance to survivor")
        with psycopg.connect(pipeline.pg_dsn) as conn:
            expected = {
                int(r[0]): f"{r[1] / 100:.2f}"
                for r in conn.execute(
                    "SELECT id, price_cents FROM products WHERE sku LIKE %s", (f"{sku_prefix}-%",)
                ).fetchall()
            }
        assert set(expected) == set(written)
        rds = redis.Redis.from_url(redis_url(pipeline), decode_responses=True)

        def redis_prices() -> dict[int, str | None]:
            values = rds.mget([f"product:{i}" for i in written])
            return {i: (json.loads(v)["price"] if v else None) for i, v in zip(written, values, strict=True)}

        eventually(lambda: redis_prices() == expected, timeout=120, what="exact prices in redis")
        ch = client_for(pipeline)
        try:
            def ch_prices() -> dict[int, str]:
                rows = ch.query(
                    "SELECT id, toString(price) FROM changeflow.products FINAL WHERE sku LIKE {p:String}",
                    parameters={"p": f"{sku_prefix}-%"},
                ).result_rows
                return {int(i): f"{Decimal(p):.2f}" for i, p in rows}

            eventually(lambda: ch_prices() == expected, timeout=120, what="exact prices in clickhouse")
        finally:
            ch.close()

        def search_prices() -> dict[int, str]:
            httpx.post(f"{search_url(pipeline)}/products/_refresh", timeout=10)
            hits = httpx.post(
                f"{search_url(pipeline)}/products/_search",
                json={"size": 1000, "query": {"prefix": {"sku": f"{sku_prefix}-"}}},
                timeout=10,
            ).json()["hits"]["hits"]
            return {int(h["_id"]): h["_source"]["price"] for h in hits}

        eventually(lambda: search_prices() == expected, timeout=120, what="exact prices in search")
    finally:
        second.stop()
        first.stop()
        first.start()
        first.wait_healthy(120)
        with psycopg.connect(pipeline.pg_dsn, autocommit=True) as conn:
            conn.execute("DELETE FROM products WHERE sku LIKE %s", (f"{sku_prefix}-%",))


def test_heartbeats_advance_the_slot_while_captured_tables_are_quiet(pipeline: Settings, commerce: Pipeline) -> None:
    def confirmed() -> Any:
        with psycopg.connect(pipeline.pg_dsn) as conn:
            row = conn.execute(
                "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = %s", (commerce.slot,)
            ).fetchone()
        assert row is not None
        return row[0]

    with psycopg.connect(pipeline.pg_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS slot_probe (id serial PRIMARY KEY, pad text)")
        start = confirmed()
        # WAL from a table nobody captures: without heartbeats the slot would hold all of it.
        conn.execute("INSERT INTO slot_probe (pad) SELECT repeat('x', 500) FROM generate_series(1, 2000)")
        end_lsn = conn.execute("SELECT pg_current_wal_lsn()").fetchone()
        assert end_lsn is not None
        try:
            eventually(lambda: confirmed() >= end_lsn[0], timeout=45, interval=1, what="slot passes the quiet WAL")
            assert confirmed() > start
            slots = {s.name: s for s in collect(pipeline, commerce).slots}
            assert slots[commerce.slot].active
            assert slots[commerce.slot].retained_wal_bytes >= 0
        finally:
            conn.execute("DROP TABLE slot_probe")
