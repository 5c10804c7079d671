"""`changeflow rebuild` while the stream keeps flowing: a new search index behind a swapped alias,
Redis keys rewritten under the version guards."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from typing import Any

import httpx
import psycopg
import pytest
import redis

from changeflow.settings import Settings
from tests.integration.conftest import eventually, redis_url, search_url

pytestmark = pytest.mark.integration


def changeflow(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "changeflow", *args], capture_output=True, text=True, timeout=900)


class WritesDuring:
    """Inserts, updates and deletes products of one SKU prefix in the background until stopped."""

    def __init__(self, settings: Settings, prefix: str) -> None:
        self.settings, self.prefix = settings, prefix
        self.ids: list[int] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run)

    def __enter__(self) -> WritesDuring:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=60)

    def run(self) -> None:
        with psycopg.connect(self.settings.pg_dsn, autocommit=True) as conn:
            i = 0
            while not self.stop.is_set() and i < 400:  # bounded: the rebuild must not outrun a test budget
                i += 1
                row = conn.execute(
                    "INSERT INTO products (sku, name, price_cents, stock) VALUES (%s, 'rebuild', %s, 1) RETURNING id",
                    (f"{self.prefix}-{i}", 100 + i),
                ).fetchone()
                assert row is not None
                self.ids.append(int(row[0]))
                if i % 4 == 0:
                    conn.execute("UPDATE products SET price_cents = price_cents + 7 WHERE id = %s", (self.ids[i // 2],))
                if i % 9 == 0:
                    conn.execute("DELETE FROM products WHERE id = %s", (self.ids[i // 3],))
                time.sleep(0.01)


def source_prices(settings: Settings, prefix: str) -> dict[str, str]:
    with psycopg.connect(settings.pg_dsn) as conn:
        rows = conn.execute("SELECT id, price_cents FROM products WHERE sku LIKE %s", (f"{prefix}-%",)).fetchall()
    return {str(i): f"{p / 100:.2f}" for i, p in rows}


def test_search_rebuild_during_writes_swaps_the_alias_to_a_complete_index(
    pipeline: Settings, sku_prefix: str
) -> None:
    base = search_url(pipeline)
    before = httpx.get(f"{base}/_alias/products", timeout=5)
    with WritesDuring(pipeline, sku_prefix) as writes:
        result = changeflow("rebuild", "search", "--entity", "products")
    assert len(writes.ids) > 50
    assert result.returncode == 0, result.stderr
    assert "alias swapped" in result.stdout
    aliases = httpx.get(f"{base}/_alias/products", timeout=5).json()
    [index] = list(aliases)
    assert index.startswith("products-") and index not in (before.json() if before.status_code == 200 else {})
    assert httpx.get(f"{base}/changeflow-rebuilds/_count", timeout=5).json()["count"] == 0

    expected = source_prices(pipeline, sku_prefix)
    assert expected

    def indexed() -> dict[str, str]:
        httpx.post(f"{base}/products/_refresh", timeout=10)
        query = {"size": 5000, "query": {"prefix": {"sku": f"{sku_prefix}-"}}}
        hits = httpx.post(f"{base}/products/_search", json=query, timeout=10).json()["hits"]["hits"]
        return {h["_id"]: h["_source"]["price"] for h in hits}

    eventually(lambda: indexed() == expected, timeout=60, what="rebuilt index equals the source")
    with psycopg.connect(pipeline.pg_dsn) as conn:
        total = conn.execute("SELECT count(*) FROM products").fetchone()
    assert total is not None
    eventually(lambda: httpx.get(f"{base}/products/_count", timeout=5).json()["count"] == total[0], timeout=60,
               what="whole index count")
    with psycopg.connect(pipeline.pg_dsn, autocommit=True) as conn:
        conn.execute("DELETE FROM products WHERE sku LIKE %s", (f"{sku_prefix}-%",))


def test_redis_rebuild_restores_deleted_and_corrupted_keys(pipeline: Settings, sku_prefix: str) -> None:
    rds = redis.Redis.from_url(redis_url(pipeline), decode_responses=True)
    with psycopg.connect(pipeline.pg_dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO products (sku, name, price_cents, stock) "
            "SELECT %s || '-' || g, 'restore', 500 + g, g FROM generate_series(1, 20) g",
            (sku_prefix,),
        )
        expected = source_prices(pipeline, sku_prefix)
        keys = [f"product:{i}" for i in expected]
        eventually(lambda: all(v is not None for v in rds.mget(keys)), what="rows in redis")
        rds.delete(*keys[:5])  # lost behind the pipeline's back
        rds.set(keys[5], json.dumps({"id": 0, "price": "0.00"}))  # corrupted
        try:
            result = changeflow("rebuild", "redis", "--entity", "products")
            assert result.returncode == 0, result.stderr
            assert "rebuilt redis products" in result.stdout

            def cached() -> dict[str, Any]:
                return {k.split(":")[1]: (json.loads(v)["price"] if v else None)
                        for k, v in zip(keys, rds.mget(keys), strict=True)}

            assert cached() == expected
        finally:
            conn.execute("DELETE FROM products WHERE sku LIKE %s", (f"{sku_prefix}-%",))
