"""Debezium-shaped backlog: the exact Connect JSON (schemas enabled) the live `commerce-postgres` connector emits.

The schema block below is copied from a message the live connector (Debezium 3.5, pgoutput) wrote for
`public.products`, so the benchmark decodes what production decodes, schema and all (about 3 KB a message).
Pure functions, no I/O.
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Iterator
from typing import Any

import orjson

_ROW_FIELDS: list[dict[str, Any]] = [
    {"type": "int64", "optional": False, "default": 0, "field": "id"},
    {"type": "string", "optional": False, "field": "sku"},
    {"type": "string", "optional": False, "field": "name"},
    {"type": "string", "optional": True, "field": "description"},
    {"type": "string", "optional": True, "field": "category"},
    {"type": "int32", "optional": False, "field": "price_cents"},
    {"type": "int32", "optional": False, "default": 0, "field": "stock"},
    {"type": "string", "optional": True, "field": "internal_notes"},
    {"type": "string", "optional": False, "name": "io.debezium.time.ZonedTimestamp", "version": 1,
     "default": "1970-01-01T00:00:00.000000Z", "field": "updated_at"},
]


def _row(field: str, prefix: str) -> dict[str, Any]:
    return {"type": "struct", "fields": _ROW_FIELDS, "optional": True, "name": f"{prefix}.public.products.Value",
            "field": field}


def value_schema(prefix: str) -> dict[str, Any]:
    return {
        "type": "struct",
        "fields": [
            _row("before", prefix),
            _row("after", prefix),
            {"type": "struct", "fields": [
                {"type": "string", "optional": False, "field": "version"},
                {"type": "string", "optional": False, "field": "connector"},
                {"type": "string", "optional": False, "field": "name"},
                {"type": "int64", "optional": False, "field": "ts_ms"},
                {"type": "string", "optional": True, "name": "io.debezium.data.Enum", "version": 1,
                 "parameters": {"allowed": "true,first,first_in_data_collection,last_in_data_collection,last,false,"
                                "incremental"}, "default": "false", "field": "snapshot"},
                {"type": "string", "optional": False, "field": "db"},
                {"type": "string", "optional": True, "field": "sequence"},
                {"type": "int64", "optional": True, "field": "ts_us"},
                {"type": "int64", "optional": True, "field": "ts_ns"},
                {"type": "string", "optional": False, "field": "schema"},
                {"type": "string", "optional": False, "field": "table"},
                {"type": "int64", "optional": True, "field": "txId"},
                {"type": "int64", "optional": True, "field": "lsn"},
                {"type": "int64", "optional": True, "field": "xmin"},
                {"type": "string", "optional": True, "field": "origin"},
                {"type": "int64", "optional": True, "field": "origin_lsn"},
            ], "optional": False, "name": "io.debezium.connector.postgresql.Source", "version": 1, "field": "source"},
            {"type": "struct", "fields": [
                {"type": "string", "optional": False, "field": "id"},
                {"type": "int64", "optional": False, "field": "total_order"},
                {"type": "int64", "optional": False, "field": "data_collection_order"},
            ], "optional": True, "name": "event.block", "version": 1, "field": "transaction"},
            {"type": "string", "optional": False, "field": "op"},
            {"type": "int64", "optional": True, "field": "ts_ms"},
            {"type": "int64", "optional": True, "field": "ts_us"},
            {"type": "int64", "optional": True, "field": "ts_ns"},
        ],
        "optional": False,
        "name": f"{prefix}.public.products.Envelope",
        "version": 2,
    }


def key_bytes(prefix: str, pid: int) -> bytes:
    return orjson.dumps({
        "schema": {"type": "struct", "fields": [{"type": "int64", "optional": False, "default": 0, "field": "id"}],
                   "optional": False, "name": f"{prefix}.public.products.Key"},
        "payload": {"id": pid},
    })


CATEGORIES = ("books", "garden", "kitchen", "toys", "tools", "music")
WORDS = ("red", "quiet", "solid", "tiny", "golden", "rapid", "lamp", "kettle", "rake", "drum", "novel", "chisel")


def product_row(rng: random.Random, pid: int, ts_us: int) -> dict[str, Any]:
    name = f"{rng.choice(WORDS)} {rng.choice(WORDS)}"
    seconds, micros = divmod(ts_us, 1_000_000)

    stamp = dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{micros:06d}Z"
    return {
        "id": pid, "sku": f"BENCH-{pid}", "name": name, "description": f"A {name} for every home, built to last.",
        "category": rng.choice(CATEGORIES), "price_cents": rng.randint(99, 99_999), "stock": rng.randint(0, 500),
        "internal_notes": "supplier margin 12%", "updated_at": stamp,
    }


def backlog(prefix: str, n: int, id_base: int, seed: int = 7, ts_ms: int = 1_795_000_000_000
            ) -> Iterator[tuple[bytes, bytes | None]]:
    """``n`` changes as (key, value) Kafka messages: each row created, then updated, about 5 % deleted.

    A delete is followed by its tombstone (null value), as Debezium does with ``tombstones.on.delete``;
    tombstones are extra messages, not counted in ``n``. LSNs increase in commit order, one per change.
    """
    rng = random.Random(seed)
    schema = orjson.dumps(value_schema(prefix))
    rows = max(1, n // 2)
    live: dict[int, dict[str, Any]] = {}
    lsn = 30_000_000
    for i in range(n):
        lsn += 64
        ts = ts_ms + i // 10
        pid = id_base + (i % rows)
        before = live.get(pid)
        if before is None:
            op, after = "c", product_row(rng, pid, ts * 1000)
        elif rng.random() < 0.05:
            op, after = "d", None
        else:
            op = "u"
            after = {**before, "price_cents": rng.randint(99, 99_999), "stock": rng.randint(0, 500)}
        if after is None:
            live.pop(pid, None)
        else:
            live[pid] = after
        payload = {
            "before": before, "after": after,
            "source": {"version": "3.5.0.Final", "connector": "postgresql", "name": prefix, "ts_ms": ts,
                       "snapshot": "false", "db": "commerce", "sequence": f'[null,"{lsn}"]', "ts_us": ts * 1000,
                       "ts_ns": ts * 1_000_000, "schema": "public", "table": "products", "txId": 1000 + i,
                       "lsn": lsn, "xmin": None, "origin": None, "origin_lsn": None},
            "transaction": None, "op": op, "ts_ms": ts + 5, "ts_us": (ts + 5) * 1000, "ts_ns": (ts + 5) * 1_000_000,
        }
        key = key_bytes(prefix, pid)
        yield key, b'{"schema":' + schema + b',"payload":' + orjson.dumps(payload) + b"}"
        if op == "d":
            yield key, None
