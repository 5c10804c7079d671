"""Columns added, renamed (expand/contract) and dropped at the source while the pipeline runs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest
import redis

from changeflow.pipelines.spec import Pipeline
from changeflow.settings import Settings
from changeflow.sinks.clickhouse import client_for, table_of
from changeflow.sinks.redis import row_key
from changeflow.sinks.search import index_name
from tests.integration.conftest import eventually, redis_url, search_url

pytestmark = pytest.mark.integration


@pytest.fixture
def pg(pipeline: Settings) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(pipeline.pg_dsn, autocommit=True) as conn:
        yield conn


def search_source(settings: Settings, index: str, key: str) -> dict[str, Any] | None:
    r = httpx.get(f"{search_url(settings)}/{index}/_doc/{key}", timeout=5)
    return r.json()["_source"] if r.status_code == 200 else None


def test_new_nullable_column_then_expand_contract_rename_reach_every_store(
    pipeline: Settings, commerce: Pipeline, pg: psycopg.Connection[Any]
) -> None:
    """orders gains `channel` (nullable text) and `priority` (integer), typed in ClickHouse as the source
    types them (the canonical schema is generated from the Connect schema), then `note` is renamed to
    `comment` the safe way: add the new column, write both, backfill, drop the old one. No restart, nothing
    lost."""
    import uuid

    rds = redis.Redis.from_url(redis_url(pipeline), decode_responses=True)
    ch = client_for(pipeline)
    orders = commerce.entities["orders"]
    table, index = f"{table_of(orders)[0]}.{table_of(orders)[1]}", index_name(orders)
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    try:
        pg.execute("ALTER TABLE orders ADD COLUMN IF NOT EXISTS channel text")
        pg.execute("ALTER TABLE orders ADD COLUMN IF NOT EXISTS note text")
        pg.execute("ALTER TABLE orders ADD COLUMN IF NOT EXISTS priority integer")
        pg.execute(
            "INSERT INTO orders (id, user_id, status, total_amount, channel, note, priority) "
            "VALUES (%s, 'evo', 'pending', 10.00, 'web', 'leave at door', 3)",
            (first,),
        )

        def in_redis(key: str, field: str, value: Any) -> dict[str, Any] | None:
            raw = rds.get(row_key(orders, key))
            doc = json.loads(raw) if raw else None
            return doc if doc and doc.get(field) == value else None

        cached = eventually(lambda: in_redis(first, "channel", "web"), what="new column in redis")
        assert cached["note"] == "leave at door"
        assert cached["priority"] == 3
        doc = eventually(lambda: (d := search_source(pipeline, index, first)) and d.get("channel") == "web" and d,
                         what="new column in search")
        assert doc["note"] == "leave at door"
        assert doc["priority"] == 3

        def ch_value(key: str, column: str) -> Any:
            try:
                rows = ch.query(f"SELECT `{column}` FROM {table} FINAL WHERE id = {{id:String}}",
                                parameters={"id": key}).result_rows
            except Exception:  # the column does not exist yet
                return None
            return rows[0][0] if rows else None

        assert eventually(lambda: ch_value(first, "channel"), what="new column in clickhouse") == "web"
        assert ch_value(first, "note") == "leave at door"
        assert eventually(lambda: ch_value(first, "priority"), what="integer column in clickhouse") == 3
        column_types = dict(ch.query(
            "SELECT name, type FROM system.columns WHERE database = {db:String} AND table = {t:String}",
            parameters={"db": table_of(orders)[0], "t": table_of(orders)[1]}).result_rows)
        # Types from the source, not Nullable(String) for whatever arrives later; integers as Int64, wide enough
        # for any widening the source may make while running.
        assert column_types["priority"] == "Nullable(Int64)"
        assert column_types["channel"] == "Nullable(String)"

        # Expand: add the new name and write both.
        pg.execute("ALTER TABLE orders ADD COLUMN IF NOT EXISTS comment text")
        pg.execute(
            "INSERT INTO orders (id, user_id, status, total_amount, channel, note, comment) "
            "VALUES (%s, 'evo', 'pending', 20.00, 'app', 'ring twice', 'ring twice')",
            (second,),
        )
        # Backfill, then contract: drop the old column.
        pg.execute("UPDATE orders SET comment = note WHERE id IN (%s, %s)", (first, second))
        pg.execute("ALTER TABLE orders DROP COLUMN note")
        pg.execute("UPDATE orders SET status = 'confirmed' WHERE id IN (%s, %s)", (first, second))

        for key, comment in ((first, "leave at door"), (second, "ring twice")):
            doc = eventually(lambda k=key: in_redis(k, "status", "confirmed"), what="contracted row in redis")
            assert doc["comment"] == comment and "note" not in doc
            found = eventually(
                lambda k=key: (d := search_source(pipeline, index, k)) and d.get("status") == "confirmed" and d,
                what="contracted row in search",
            )
            assert found["comment"] == comment and "note" not in found
            eventually(lambda k=key: ch_value(k, "status") == "confirmed", what="contracted row in clickhouse")
            assert ch_value(key, "comment") == comment
            assert ch_value(key, "channel") in ("web", "app")
    finally:
        pg.execute("DELETE FROM orders WHERE id IN (%s, %s)", (first, second))
        for column in ("channel", "note", "comment", "priority"):
            pg.execute(f"ALTER TABLE orders DROP COLUMN IF EXISTS {column}")
        ch.close()
