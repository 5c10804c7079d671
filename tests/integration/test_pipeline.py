"""Products changed in PostgreSQL land exactly in Redis, the search index and ClickHouse."""

from __future__ import annotations

import json
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx
import psycopg
import pytest
import redis

from changeflow.pipelines.spec import Pipeline
from changeflow.settings import Settings
from changeflow.sinks.clickhouse import client_for
from tests.integration.conftest import eventually, redis_url, search_url

pytestmark = pytest.mark.integration


@pytest.fixture
def pg(pipeline: Settings) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(pipeline.pg_dsn, autocommit=True) as conn:
        yield conn


@pytest.fixture
def rds(pipeline: Settings) -> redis.Redis:
    return redis.Redis.from_url(redis_url(pipeline), decode_responses=True)


@pytest.fixture
def ch(pipeline: Settings) -> Iterator[Any]:
    client = client_for(pipeline)
    yield client
    client.close()


def search_doc(settings: Settings, pid: int) -> dict[str, Any] | None:
    response = httpx.get(f"{search_url(settings)}/products/_doc/{pid}", timeout=5)
    if response.status_code == 404:
        return None
    response.raise_for_status()
    body = response.json()
    return body["_source"] if body.get("found") else None


def search_ids(settings: Settings, query: dict[str, Any]) -> list[str]:
    httpx.post(f"{search_url(settings)}/products/_refresh", timeout=10)
    response = httpx.post(f"{search_url(settings)}/products/_search", json={"query": query}, timeout=10)
    response.raise_for_status()
    return sorted(hit["_id"] for hit in response.json()["hits"]["hits"])


def ch_row(ch: Any, pid: int) -> dict[str, Any] | None:
    result = ch.query(
        "SELECT id, sku, name, description, category, price, stock, _is_deleted, _version "
        "FROM changeflow.products FINAL WHERE id = {id:Int64}",
        parameters={"id": pid},
    )
    rows = list(result.named_results())
    return rows[0] if rows else None


def test_insert_update_delete_reach_every_store(
    pipeline: Settings, pg: psycopg.Connection[Any], rds: redis.Redis, ch: Any, sku_prefix: str
) -> None:
    sku = f"{sku_prefix}-KETTLE"
    row = pg.execute(
        "INSERT INTO products (sku, name, description, category, price_cents, stock, internal_notes) "
        "VALUES (%s, 'whistling kettle', 'Stovetop kettle in brushed steel', 'kitchen', 4599, 12, 'cost 21.00') "
        "RETURNING id",
        (sku,),
    ).fetchone()
    assert row is not None
    pid = int(row[0])

    # Redis: the cache projection, exact JSON, no internal fields.
    cached = eventually(lambda: rds.get(f"product:{pid}"), what="redis insert")
    product = json.loads(cached)
    assert {k: product[k] for k in ("id", "sku", "name", "description", "category", "price", "stock")} == {
        "id": pid, "sku": sku, "name": "whistling kettle", "description": "Stovetop kettle in brushed steel",
        "category": "kitchen", "price": "45.99", "stock": 12,
    }
    assert "internal_notes" not in product
    assert "price_cents" not in product

    # Search: the document, searchable by name, description and sku.
    doc = eventually(lambda: search_doc(pipeline, pid), what="search insert")
    assert doc["sku"] == sku and doc["price"] == "45.99" and "internal_notes" not in doc
    assert str(pid) in search_ids(pipeline, {"match": {"name": "whistling"}})
    assert str(pid) in search_ids(pipeline, {"match": {"description": "brushed"}})
    assert search_ids(pipeline, {"term": {"sku": sku}}) == [str(pid)]

    # ClickHouse: current state with an exact Decimal price.
    ch_current = eventually(lambda: ch_row(ch, pid), what="clickhouse insert")
    assert ch_current["sku"] == sku
    assert ch_current["price"] == Decimal("45.99")
    assert ch_current["stock"] == 12
    assert ch_current["_is_deleted"] == 0

    # Update the price: every store follows.
    pg.execute("UPDATE products SET price_cents = 3999, stock = 11 WHERE id = %s", (pid,))
    eventually(lambda: json.loads(rds.get(f"product:{pid}") or "{}").get("price") == "39.99", what="redis update")
    eventually(lambda: (search_doc(pipeline, pid) or {}).get("price") == "39.99", what="search update")
    updated = eventually(lambda: (r := ch_row(ch, pid)) and r["price"] == Decimal("39.99") and r, what="ch update")
    assert updated["stock"] == 11
    assert updated["_version"] > ch_current["_version"]

    # Delete: gone from Redis and the index, marked deleted in ClickHouse.
    pg.execute("DELETE FROM products WHERE id = %s", (pid,))
    eventually(lambda: rds.get(f"product:{pid}") is None, what="redis delete")
    eventually(lambda: search_doc(pipeline, pid) is None, what="search delete")
    eventually(lambda: ch_row(ch, pid) is None, what="clickhouse delete (FINAL hides it)")
    deleted = ch.query(
        "SELECT _is_deleted FROM changeflow.products WHERE id = {id:Int64} ORDER BY _version DESC LIMIT 1",
        parameters={"id": pid},
    ).result_rows
    assert deleted == [(1,)]

    # The changelog holds every change, in version order.
    ops = ch.query(
        "SELECT op FROM changeflow.changelog FINAL WHERE entity = 'products' AND key = {k:String} ORDER BY version",
        parameters={"k": str(pid)},
    ).result_rows
    assert [op for (op,) in ops] == ["c", "u", "d"]
    changelog_text = ch.command(
        "SELECT groupConcat(coalesce(after, '')) FROM changeflow.changelog WHERE key = {k:String}",
        parameters={"k": str(pid)},
    )
    assert "cost 21.00" not in str(changelog_text)


def test_replayed_older_version_changes_nothing_in_redis(
    pipeline: Settings, commerce: Pipeline, rds: redis.Redis, sku_prefix: str
) -> None:
    """The Redis version guard: a record older than the stored one is ignored; a delete leaves a tombstone."""
    from changeflow.sinks.redis import RedisStore
    from changeflow.streams.records import ChangeRecord

    sink = RedisStore(pipeline, commerce)
    key = f"{sku_prefix}-guard"
    newer = ChangeRecord("postgres", "products", key, "u", 200, 0, None, {"id": 1, "name": "new"})
    older = ChangeRecord("postgres", "products", key, "u", 100, 0, None, {"id": 1, "name": "old"})
    delete = ChangeRecord("postgres", "products", key, "d", 300, 0, {"id": 1}, None)
    try:
        sink.write_batch([newer, older])
        assert json.loads(rds.get(f"product:{key}") or "{}")["name"] == "new"
        sink.write_batch([delete])
        sink.write_batch([newer])  # a late replay of an older update after the delete
        assert rds.get(f"product:{key}") is None
    finally:
        rds.delete(f"product:{key}")
        rds.hdel(f"{commerce.namespace}:versions", f"product:{key}")
        sink.close()
