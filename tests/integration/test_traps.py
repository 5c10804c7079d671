"""The known CDC traps, live: TOASTed columns left unchanged, and derived price events."""

from __future__ import annotations

import json
import secrets
import uuid
from collections.abc import Iterator
from typing import Any

import orjson
import psycopg
import pytest
import redis
from confluent_kafka import Consumer, TopicPartition

from changeflow.pipelines.spec import Pipeline
from changeflow.settings import Settings
from changeflow.sinks.clickhouse import client_for
from changeflow.streams.debezium import UNAVAILABLE
from tests.integration.conftest import eventually, redis_url, search_url

pytestmark = pytest.mark.integration


@pytest.fixture
def pg(pipeline: Settings) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(pipeline.pg_dsn, autocommit=True) as conn:
        yield conn


def test_unchanged_toasted_column_is_never_written_as_the_placeholder(
    pipeline: Settings, pg: psycopg.Connection[Any]
) -> None:
    order_id = str(uuid.uuid4())
    # Random hex does not compress, so ~40 kB of items is stored out of line (TOAST).
    items = [{"sku": f"SKU-{i}", "note": secrets.token_hex(200)} for i in range(100)]
    pg.execute(
        "INSERT INTO orders (id, user_id, status, total_amount, items) VALUES (%s, 'toast-user', 'pending', 99.95, %s)",
        (order_id, json.dumps(items)),
    )
    toasted = pg.execute(
        "SELECT pg_column_size(items) < octet_length(items::text) FROM orders WHERE id = %s", (order_id,)
    ).fetchone()
    assert toasted is not None
    rds = redis.Redis.from_url(redis_url(pipeline), decode_responses=True)
    ch = client_for(pipeline)
    try:
        eventually(lambda: rds.get(f"order:{order_id}"), what="order in redis")
        # Only the status changes: Debezium sends items as the unavailable placeholder.
        pg.execute("UPDATE orders SET status = 'confirmed', updated_at = now() WHERE id = %s", (order_id,))
        cached = eventually(
            lambda: (v := rds.get(f"order:{order_id}")) and json.loads(v)["status"] == "confirmed" and json.loads(v),
            what="status update in redis",
        )
        assert cached["items"] == items
        assert UNAVAILABLE not in json.dumps(cached)

        def ch_current() -> tuple[str, str] | None:
            rows = ch.query(
                "SELECT status, items FROM changeflow.orders FINAL WHERE id = {id:String}", parameters={"id": order_id}
            ).result_rows
            return rows[0] if rows and rows[0][0] == "confirmed" else None

        _status, stored_items = eventually(ch_current, what="status update in clickhouse")
        assert json.loads(stored_items) == items

        def search_doc() -> dict[str, Any] | None:
            import httpx

            r = httpx.get(f"{search_url(pipeline)}/orders/_doc/{order_id}", timeout=5)
            doc = r.json().get("_source") if r.status_code == 200 else None
            return doc if doc and doc.get("status") == "confirmed" else None

        doc = eventually(search_doc, what="status update in search")
        assert doc["items"] == items
        changelog = ch.command(
            "SELECT count() FROM changeflow.changelog WHERE key = {k:String} AND position(after, {p:String}) > 0",
            parameters={"k": order_id, "p": UNAVAILABLE},
        )
        assert int(changelog) == 0
    finally:
        pg.execute("DELETE FROM orders WHERE id = %s", (order_id,))
        ch.close()


def test_price_change_emits_product_price_changed(
    pipeline: Settings, commerce: Pipeline, pg: psycopg.Connection[Any], sku_prefix: str
) -> None:
    topic = f"{commerce.namespace}.products.price_changed"
    consumer = Consumer({"bootstrap.servers": pipeline.kafka_bootstrap, "group.id": f"test-{uuid.uuid4()}",
                         "enable.auto.commit": False})
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        ends = [TopicPartition(topic, p, consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1])
                for p in parts]
        consumer.assign(ends)
        row = pg.execute(
            "INSERT INTO products (sku, name, price_cents, stock) VALUES (%s, 'price probe', 1000, 1) RETURNING id",
            (f"{sku_prefix}-P",),
        ).fetchone()
        assert row is not None
        pid = str(row[0])
        pg.execute("UPDATE products SET stock = 2 WHERE id = %s", (pid,))  # no price change: no event
        pg.execute("UPDATE products SET price_cents = 1299 WHERE id = %s", (pid,))
        events: list[dict[str, Any]] = []

        def got_event() -> bool:
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None and msg.key() == f"products:{pid}".encode():
                events.append(orjson.loads(msg.value()))
            return bool(events)

        eventually(got_event, timeout=60, interval=0, what="price_changed event")
        event = events[0]
        assert {k: event[k] for k in ("type", "id", "old_price", "new_price")} == {
            "type": "product.price_changed", "id": pid, "old_price": "10.00", "new_price": "12.99"}
        assert event["version"] > 0
    finally:
        consumer.close()
        pg.execute("DELETE FROM products WHERE sku LIKE %s", (f"{sku_prefix}-%",))


def test_primary_key_change_moves_the_row_in_every_store(
    pipeline: Settings, pg: psycopg.Connection[Any], sku_prefix: str
) -> None:
    """Debezium turns it into a delete of the old key (plus tombstone) and a create of the new one."""
    import httpx

    row = pg.execute(
        "INSERT INTO products (sku, name, price_cents, stock) VALUES (%s, 'rekeyed', 700, 1) RETURNING id",
        (f"{sku_prefix}-K",),
    ).fetchone()
    assert row is not None
    old = int(row[0])
    new = old + 900_000_000
    rds = redis.Redis.from_url(redis_url(pipeline), decode_responses=True)
    ch = client_for(pipeline)
    try:
        eventually(lambda: rds.get(f"product:{old}"), what="old key in redis")
        pg.execute("UPDATE products SET id = %s WHERE id = %s", (new, old))
        moved = eventually(lambda: rds.get(f"product:{new}"), what="new key in redis")
        assert json.loads(moved)["sku"] == f"{sku_prefix}-K"
        eventually(lambda: rds.get(f"product:{old}") is None, what="old key gone from redis")

        def doc(key: int) -> int:
            return httpx.get(f"{search_url(pipeline)}/products/_doc/{key}", timeout=5).status_code

        eventually(lambda: doc(new) == 200 and doc(old) == 404, what="search moved")

        def ch_ids() -> list[int]:
            rows = ch.query("SELECT id FROM changeflow.products FINAL WHERE sku = {s:String}",
                            parameters={"s": f"{sku_prefix}-K"}).result_rows
            return [r[0] for r in rows]

        eventually(lambda: ch_ids() == [new], what="clickhouse moved")
    finally:
        pg.execute("DELETE FROM products WHERE sku LIKE %s", (f"{sku_prefix}-%",))
        ch.close()
