"""Debezium PostgreSQL envelopes in the documented JSON-converter shape (schemas enabled).

Built field by field like Debezium 3.x emits them for `commerce.public.products`, so each test can
vary one thing. tests/fixtures/debezium/ holds messages captured from the live connector.
"""

from __future__ import annotations

import base64
from typing import Any

import orjson

PRODUCT_FIELDS: list[dict[str, Any]] = [
    {"type": "int64", "optional": False, "default": 0, "field": "id"},
    {"type": "string", "optional": False, "field": "sku"},
    {"type": "string", "optional": False, "field": "name"},
    {"type": "string", "optional": True, "field": "description"},
    {"type": "string", "optional": True, "field": "category"},
    {"type": "int32", "optional": False, "field": "price_cents"},
    {"type": "int32", "optional": False, "default": 0, "field": "stock"},
    {"type": "string", "optional": True, "field": "internal_notes"},
    {"type": "string", "optional": False, "name": "io.debezium.time.ZonedTimestamp", "version": 1,
     "field": "updated_at"},
]


def row_schema(
    field: str, fields: list[dict[str, Any]], name: str = "commerce.public.products.Value"
) -> dict[str, Any]:
    return {"type": "struct", "fields": fields, "optional": True, "name": name, "field": field}


SOURCE_SCHEMA = {
    "type": "struct",
    "fields": [
        {"type": "string", "optional": False, "field": "version"},
        {"type": "string", "optional": False, "field": "connector"},
        {"type": "string", "optional": False, "field": "name"},
        {"type": "int64", "optional": False, "field": "ts_ms"},
        {"type": "string", "optional": True, "field": "snapshot"},
        {"type": "string", "optional": False, "field": "db"},
        {"type": "string", "optional": False, "field": "schema"},
        {"type": "string", "optional": False, "field": "table"},
        {"type": "int64", "optional": True, "field": "txId"},
        {"type": "int64", "optional": True, "field": "lsn"},
    ],
    "optional": False,
    "name": "io.debezium.connector.postgresql.Source",
    "field": "source",
}


def product_row(pid: int = 1, **overrides: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": pid,
        "sku": f"SKU-{pid}",
        "name": "quiet kettle",
        "description": "A quiet kettle for every home.",
        "category": "kitchen",
        "price_cents": 1999,
        "stock": 5,
        "internal_notes": "supplier margin 12%",
        "updated_at": "2026-11-24T10:15:30.123456Z",
    }
    row.update(overrides)
    return row


def envelope(
    op: str,
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
    lsn: int = 26_000_000,
    table: str = "products",
    fields: list[dict[str, Any]] | None = None,
    snapshot: str = "false",
    ts_ms: int = 1_795_000_000_000,
) -> dict[str, Any]:
    fields = fields or PRODUCT_FIELDS
    return {
        "schema": {
            "type": "struct",
            "fields": [
                row_schema("before", fields, f"commerce.public.{table}.Value"),
                row_schema("after", fields, f"commerce.public.{table}.Value"),
                SOURCE_SCHEMA,
                {"type": "string", "optional": False, "field": "op"},
                {"type": "int64", "optional": True, "field": "ts_ms"},
            ],
            "optional": False,
            "name": f"commerce.public.{table}.Envelope",
            "version": 2,
        },
        "payload": {
            "before": before,
            "after": after,
            "source": {
                "version": "3.3.1.Final", "connector": "postgresql", "name": "commerce", "ts_ms": ts_ms,
                "snapshot": snapshot, "db": "commerce", "schema": "public", "table": table,
                "txId": 780, "lsn": lsn,
            },
            "op": op,
            "ts_ms": ts_ms + 40,
        },
    }


def encoded(message: dict[str, Any]) -> bytes:
    return orjson.dumps(message)


def decimal_bytes(unscaled: int) -> str:
    length = max(1, (unscaled.bit_length() + 8) // 8)
    return base64.b64encode(unscaled.to_bytes(length, "big", signed=True)).decode()
