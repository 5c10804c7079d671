"""Identifiers from data never become DDL: a source column named to break out of ClickHouse's quoting.

ClickHouse honours backslash escapes inside backticks, so doubling backticks is not quoting (ARCHITECTURE.md,
"Known traps"): a column added at the source with the name below used to drop `name` from the warehouse table.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import psycopg
import pytest
import redis
from clickhouse_connect.driver.binding import quote_identifier
from psycopg import sql

from changeflow.pipelines.spec import Pipeline
from changeflow.settings import Settings
from changeflow.sinks.clickhouse import client_for, table_of
from changeflow.sinks.redis import row_key
from tests.integration.conftest import eventually, redis_url

pytestmark = pytest.mark.integration

# The name without its trailing " --": Debezium itself strips that from a column name (measured:
# the raw change carries "... pwned String " as the field), so the test would follow Debezium, not us.
HOSTILE = "x` Nullable(String), DROP COLUMN name, ADD COLUMN pwned String"
BACKSLASH = "ends with a backslash\\"


def clickhouse_columns(settings: Settings, database: str, table: str) -> dict[str, str]:
    ch = client_for(settings)
    try:
        rows = ch.query("SELECT name, type FROM system.columns WHERE database = {d:String} AND table = {t:String}",
                        parameters={"d": database, "t": table}).result_rows
    finally:
        ch.close()
    return {n: t for n, t in rows}


def test_a_hostile_column_name_is_one_quoted_column_and_drops_nothing(pipeline: Settings, commerce: Pipeline) -> None:
    products = commerce.entity("products")
    sku = f"INJ-{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pipeline.pg_dsn, autocommit=True) as pg:
        try:
            for column in (HOSTILE, BACKSLASH):
                pg.execute(sql.SQL("ALTER TABLE products ADD COLUMN IF NOT EXISTS {} text").format(
                    sql.Identifier(column)))
            row = pg.execute(
                sql.SQL("INSERT INTO products (sku, name, price_cents, stock, {}, {}) VALUES (%s, 'kept', 100, 1, "
                        "'payload', 'tail') RETURNING id").format(sql.Identifier(HOSTILE), sql.Identifier(BACKSLASH)),
                (sku,)).fetchone()
            assert row is not None
            key = str(row[0])
            rds = redis.Redis.from_url(redis_url(pipeline), decode_responses=True)
            doc: dict[str, Any] = eventually(
                lambda: (v := rds.get(row_key(products, key))) and json.loads(v), timeout=90, what="row in redis")
            assert HOSTILE in doc, doc
            assert doc[HOSTILE] == "payload" and doc[BACKSLASH] == "tail" and doc["name"] == "kept"
            columns = eventually(
                lambda: (c := clickhouse_columns(pipeline, table_of(products)[0], table_of(products)[1]))
                and HOSTILE in c and BACKSLASH in c and c, timeout=90, what="the columns in clickhouse")
            assert "name" in columns and "pwned" not in columns
            assert columns[HOSTILE] == "Nullable(String)" and columns[BACKSLASH] == "Nullable(String)"
            table = f"{quote_identifier(table_of(products)[0])}.{quote_identifier(table_of(products)[1])}"
            ch = client_for(pipeline)
            try:
                found = eventually(lambda: ch.query(
                    f"SELECT name, {quote_identifier(HOSTILE)}, {quote_identifier(BACKSLASH)} FROM {table} FINAL "
                    "WHERE sku = {sku:String}", parameters={"sku": sku}).result_rows, timeout=90,
                    what="row in clickhouse")
            finally:
                ch.close()
            assert found == [("kept", "payload", "tail")]
        finally:
            pg.execute("DELETE FROM products WHERE sku = %s", (sku,))
            for column in (HOSTILE, BACKSLASH):
                pg.execute(sql.SQL("ALTER TABLE products DROP COLUMN IF EXISTS {}").format(sql.Identifier(column)))
