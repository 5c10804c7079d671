"""Decode Debezium's Kafka Connect JSON envelope (schemas enabled) into canonical change records.

Pure functions: bytes in, a ``Decoded`` value out; no I/O. Values are typed from the Connect schema
that travels with each message, so NUMERIC becomes an exact ``Decimal`` whatever Debezium's
``decimal.handling.mode`` (precise bytes, VariableScaleDecimal, string, double) and times become UTC
datetimes.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Mapping
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson

from streams.records import ChangeRecord, DeadLetter, Decoded, Skip

UNAVAILABLE = "__debezium_unavailable_value"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
EPOCH_DATE = date(1970, 1, 1)

Transform = Callable[[dict[str, Any]], dict[str, Any]]


class DecodeError(ValueError):
    """Raised inside this module only; callers receive a DeadLetter."""


def _decimal_from_bytes(raw: str, scale: int) -> Decimal:
    unscaled = int.from_bytes(base64.b64decode(raw), "big", signed=True)
    return Decimal(unscaled).scaleb(-scale)


def convert_value(value: Any, schema: Mapping[str, Any]) -> Any:
    """One Connect value typed by its schema; unknown logical types pass through unchanged."""
    if value is None:
        return None
    if value == UNAVAILABLE:
        return UNAVAILABLE
    name = schema.get("name")
    if name == "org.apache.kafka.connect.data.Decimal":
        if isinstance(value, str):
            return _decimal_from_bytes(value, int(schema.get("parameters", {}).get("scale", 0)))
        return Decimal(str(value))
    if name == "io.debezium.data.VariableScaleDecimal":
        return _decimal_from_bytes(value["value"], int(value["scale"]))
    if name in ("io.debezium.time.MicroTimestamp",):
        return EPOCH + timedelta(microseconds=int(value))
    if name in ("io.debezium.time.Timestamp", "org.apache.kafka.connect.data.Timestamp"):
        return EPOCH + timedelta(milliseconds=int(value))
    if name == "io.debezium.time.NanoTimestamp":
        return EPOCH + timedelta(microseconds=int(value) // 1000)
    if name == "io.debezium.time.ZonedTimestamp":
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).astimezone(UTC)
    if name in ("io.debezium.time.Date", "org.apache.kafka.connect.data.Date"):
        return EPOCH_DATE + timedelta(days=int(value))
    if name == "io.debezium.data.Json":
        return orjson.loads(value) if isinstance(value, str) else value
    if schema.get("type") == "array" and isinstance(value, list):
        items = schema.get("items", {})
        return [convert_value(v, items) for v in value]
    return value


def convert_row(row: Mapping[str, Any] | None, schema: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if row is None:
        return None
    fields = {f["field"]: f for f in (schema or {}).get("fields", [])}
    return {name: convert_value(value, fields.get(name, {})) for name, value in row.items()}


def without_unavailable(row: dict[str, Any] | None) -> dict[str, Any] | None:
    """Drop TOAST placeholders: an unchanged TOASTed column is *unknown* here, never a value to store."""
    if row is None or UNAVAILABLE not in row.values():
        return row
    return {k: v for k, v in row.items() if v != UNAVAILABLE}


def _row_schema(envelope_schema: Mapping[str, Any], which: str) -> Mapping[str, Any] | None:
    for f in envelope_schema.get("fields", []):
        if f.get("field") == which:
            return f
    return None


def parse_lsn(source: Mapping[str, Any]) -> int:
    """The change's position in commit order.

    Incremental-snapshot reads (rebuild, repair) carry no ``lsn``: Debezium emits them when the snapshot
    window closes, and ``source.sequence`` (``["lastCommitLsn", "lsn"]``) holds the stream position at
    that moment. Every change of the row before it is older and every later one newer, so that
    position orders the read correctly against the stream.
    """
    lsn = source.get("lsn")
    if lsn is not None:
        return int(lsn)
    sequence = source.get("sequence")
    if isinstance(sequence, str):
        try:
            positions = [int(p) for p in orjson.loads(sequence) if p is not None]
        except (orjson.JSONDecodeError, TypeError, ValueError):
            positions = []
        if positions:
            return max(positions)
    raise DecodeError("source.lsn missing: cannot order this change")


def decode_postgres(
    raw_value: bytes | None,
    *,
    topic: str,
    partition: int,
    offset: int,
    raw_key: bytes | None = None,
    entities: Mapping[str, Transform] | None = None,
) -> Decoded:
    """A Debezium PostgreSQL message → canonical record, dead letter, or skip.

    ``entities`` maps a table name to the entity's transform (rename, derive, drop secrets); a table
    that is not listed is skipped, so capturing an extra table never breaks the stream.
    """
    if raw_value is None:
        return Skip("tombstone")

    def dead(reason: str) -> DeadLetter:
        return DeadLetter(raw_key, raw_value, topic, partition, offset, reason)

    try:
        message = orjson.loads(raw_value)
    except orjson.JSONDecodeError as exc:
        return dead(f"not JSON: {exc}")
    if not isinstance(message, dict):
        return dead("not a JSON object")
    payload = message.get("payload", message) if "schema" in message else message
    schema = message.get("schema") or {}
    if not isinstance(payload, dict):
        return dead("payload is not an object")
    if payload.get("status") in ("BEGIN", "END") and "op" not in payload:
        return Skip("transaction metadata")
    if schema.get("name", "").endswith(".Heartbeat") or (
        "ts_ms" in payload and "op" not in payload and "source" not in payload
    ):
        return Skip("heartbeat")
    op = payload.get("op")
    if op not in ("c", "u", "d", "r"):
        return dead(f"unknown op {op!r}")
    source = payload.get("source")
    if not isinstance(source, dict):
        return dead("source block missing")
    table = source.get("table")
    if not isinstance(table, str):
        return dead("source.table missing")
    transform = (entities or {}).get(table)
    if entities is not None and transform is None:
        return Skip(f"table {table} not mapped")
    try:
        version = parse_lsn(source)
        before = without_unavailable(convert_row(payload.get("before"), _row_schema(schema, "before")))
        after = convert_row(payload.get("after"), _row_schema(schema, "after"))
        partial = after is not None and UNAVAILABLE in after.values()
        after = without_unavailable(after)
        if transform is not None:
            before = transform(before) if before is not None else None
            after = transform(after) if after is not None else None
        row = after if after is not None else before
        if row is None or row.get("id") is None:
            raise DecodeError("no primary key in before/after")
        ts_ms = int(source.get("ts_ms") or payload.get("ts_ms") or 0)
    except (DecodeError, ValueError, TypeError, KeyError, ArithmeticError) as exc:
        return dead(f"{type(exc).__name__}: {exc}")
    return ChangeRecord(
        source="postgres",
        entity=table,
        key=str(row["id"]),
        op=op,
        version=version,
        ts_ms=ts_ms,
        before=before,
        after=None if op == "d" else after,
        origin=(topic, partition, offset),
        partial=partial,
    )
