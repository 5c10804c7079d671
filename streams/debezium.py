"""Decode Debezium's Kafka Connect JSON envelope (schemas enabled) into canonical change records.

Pure functions: bytes in, a ``Decoded`` value out; no I/O. Values are typed from the Connect schema
that travels with each message, so NUMERIC becomes an exact ``Decimal`` whatever Debezium's
``decimal.handling.mode`` (precise bytes, VariableScaleDecimal, string, double) and times become UTC
datetimes.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any, cast

import orjson

from pipelines.transform import FILTERED, ExpressionError, Transformer
from pipelines.types import ColumnType, from_connect, from_value
from streams.keys import key_text
from streams.records import ChangeRecord, DeadLetter, Decoded, Op, Skip

UNAVAILABLE = "__debezium_unavailable_value"
# The placeholder as Debezium writes it into a bytea column (its bytes, base64 in JSON) and into arrays.
UNAVAILABLE_B64 = base64.b64encode(UNAVAILABLE.encode()).decode()
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
EPOCH_DATE = date(1970, 1, 1)



class DecodeError(ValueError):
    """Raised inside this module only; callers receive a DeadLetter."""


def _decimal_from_bytes(raw: str, scale: int) -> Decimal:
    unscaled = int.from_bytes(base64.b64decode(raw), "big", signed=True)
    # From text, not `scaleb`: arithmetic rounds to the context's 28 digits, a constructor never does
    # (an unconstrained numeric of 32 digits lost its last four that way).
    return Decimal(f"{unscaled}E{-scale}")


def convert_value(value: Any, schema: Mapping[str, Any]) -> Any:
    """One Connect value typed by its schema; unknown logical types pass through unchanged."""
    if value is None:
        return None
    if value == UNAVAILABLE:
        return UNAVAILABLE
    name = schema.get("name")
    kind = schema.get("type")
    if name == "org.apache.kafka.connect.data.Decimal":
        if isinstance(value, str):
            if value == UNAVAILABLE_B64:
                return UNAVAILABLE
            return _decimal_from_bytes(value, int((schema.get("parameters") or {}).get("scale", 0)))
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
    if kind == "bytes" and isinstance(value, str):
        if value == UNAVAILABLE_B64:
            return UNAVAILABLE
        return base64.b64decode(value, validate=True)
    if kind == "array" and isinstance(value, list):
        if value == [UNAVAILABLE]:
            return UNAVAILABLE
        items = schema.get("items") or {}
        return [convert_value(v, items) for v in value]
    return value


def _fields(row_schema: Mapping[str, Any] | None) -> dict[str, Mapping[str, Any]]:
    fields = (row_schema or {}).get("fields") or []
    return {f["field"]: f for f in fields if isinstance(f, dict) and isinstance(f.get("field"), str)}


def convert_row(row: Mapping[str, Any] | None, fields: Mapping[str, Mapping[str, Any]]) -> dict[str, Any] | None:
    if row is None:
        return None
    if not isinstance(row, dict):
        raise DecodeError(f"row image is {type(row).__name__}, not an object")
    return {name: convert_value(value, fields.get(name, {})) for name, value in row.items()}


def without_unavailable(row: dict[str, Any] | None) -> dict[str, Any] | None:
    """Drop TOAST placeholders: an unchanged TOASTed column is *unknown* here, never a value to store."""
    if row is None or UNAVAILABLE not in row.values():
        return row
    return {k: v for k, v in row.items() if v != UNAVAILABLE}


def _row_schema(envelope_schema: Mapping[str, Any], which: str) -> Mapping[str, Any] | None:
    for f in envelope_schema.get("fields", []):
        if isinstance(f, dict) and f.get("field") == which:
            return f
    return None


_CONNECT_TYPES: dict[tuple[Any, ...], ColumnType] = {}

# --- the Connect schema, parsed once per distinct schema -------------------------------------------
# With `schemas.enable=true` every message carries the table's whole Connect schema (measured: 2.9 KB of a
# 3.9 KB products change), byte for byte the same until the table changes. The converter writes
# `{"schema":<schema>,"payload":<payload>}`, so the schema's bytes are cut out, looked up, and parsed only
# when new; only the payload is parsed per message. A cut at the wrong place (the marker inside the
# schema, e.g. a parameter named "payload") leaves an unbalanced prefix that does not parse, and then the
# whole message is parsed as before: the shortcut never changes what is decoded.
_SCHEMA_PREFIX = b'{"schema":'
_PAYLOAD_MARK = b',"payload":'
_SCHEMAS: dict[bytes, dict[str, Any]] = {}
_CACHED: dict[int, dict[str, Any]] = {}
_ROW_FIELDS: dict[int, tuple[dict[str, Mapping[str, Any]], dict[str, Mapping[str, Any]]]] = {}
_MAX_SCHEMAS = 512


def parse_message(raw: bytes) -> Any:
    """``orjson.loads(raw)``, with the Connect schema parsed once per distinct schema (see above)."""
    if raw[:10] == _SCHEMA_PREFIX and raw[-1:] == b"}":
        cut = raw.find(_PAYLOAD_MARK, 10)
        if cut > 0:
            schema_bytes = raw[10:cut]
            schema = _SCHEMAS.get(schema_bytes)
            try:
                if schema is None:
                    parsed = orjson.loads(schema_bytes)
                    if not isinstance(parsed, dict):
                        return orjson.loads(raw)
                    if len(_SCHEMAS) >= _MAX_SCHEMAS:
                        _SCHEMAS.clear()
                        _CACHED.clear()
                        _ROW_FIELDS.clear()
                    schema = _SCHEMAS[schema_bytes] = _CACHED[id(parsed)] = parsed
                return {"schema": schema, "payload": orjson.loads(raw[cut + len(_PAYLOAD_MARK):-1])}
            except orjson.JSONDecodeError:
                pass
    return orjson.loads(raw)


def row_fields(schema: Mapping[str, Any]) -> tuple[dict[str, Mapping[str, Any]], dict[str, Mapping[str, Any]]]:
    """(before, after) fields by column name; kept with a cached schema (never mutated by decoding)."""
    cached = _ROW_FIELDS.get(id(schema))
    if cached is not None:
        return cached
    before = _fields(_row_schema(schema, "before"))
    out = (before, _fields(_row_schema(schema, "after")) or before)
    if _CACHED.get(id(schema)) is schema:  # only a cached schema lives as long as its entry
        _ROW_FIELDS[id(schema)] = out
    return out


def column_types(fields: Mapping[str, Mapping[str, Any]]) -> dict[str, ColumnType]:
    """The source's type of every column, from the Connect schema (cached per distinct field schema)."""
    out: dict[str, ColumnType] = {}
    for name, f in fields.items():
        params = f.get("parameters")
        sig = (f.get("type"), f.get("name"), tuple(sorted(params.items())) if isinstance(params, dict) else None,
               orjson.dumps(f.get("items")) if "items" in f else None)
        t = _CONNECT_TYPES.get(sig)
        if t is None:
            t = _CONNECT_TYPES[sig] = from_connect(f)
        out[name] = t
    return out


def output_types(row: Mapping[str, Any], source: Mapping[str, ColumnType],
                 declared: Mapping[str, ColumnType]) -> dict[str, ColumnType]:
    """Types of a transformed row: declared in the pipeline, else the source's, else the value's own."""
    out: dict[str, ColumnType] = {}
    for name, value in row.items():
        t = declared.get(name) or source.get(name) or from_value(value) or ColumnType("string")
        out[name] = t
    return out


def message_key(raw_key: bytes | None) -> dict[str, Any] | None:
    """The Debezium message key's columns (the primary key, or `message.key.columns`)."""
    if raw_key is None:
        return None
    key = orjson.loads(raw_key)
    if isinstance(key, dict) and "payload" in key and "schema" in key:
        key = key["payload"]
    if not isinstance(key, dict) or not key:
        raise DecodeError("message key is not an object of key columns")
    return key


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
    entities: Mapping[tuple[str, str], Transformer] | None = None,
) -> Decoded:
    """A Debezium PostgreSQL message → canonical record, dead letter, or skip.

    ``entities`` maps (schema, table) to the entity's compiled transform; a table that is not listed is
    skipped (and counted by the caller), so capturing an extra table never breaks the stream. Without
    ``entities`` (fixtures, tools) the record is named after the table and kept as it came.
    """
    if raw_value is None:
        return Skip("tombstone")

    def dead(reason: str) -> DeadLetter:
        return DeadLetter(raw_key, raw_value, topic, partition, offset, reason)

    try:
        message = parse_message(raw_value)
    except orjson.JSONDecodeError as exc:
        return dead(f"not JSON: {exc}")
    if not isinstance(message, dict):
        return dead("not a JSON object")
    payload = message.get("payload", message) if "schema" in message else message
    schema = message.get("schema") or {}
    if not isinstance(payload, dict):
        return dead("payload is not an object")
    if not isinstance(schema, dict):
        return dead("schema is not an object")
    if payload.get("status") in ("BEGIN", "END") and "op" not in payload:
        return Skip("transaction metadata")
    schema_name = schema.get("name")
    if (isinstance(schema_name, str) and schema_name.endswith(".Heartbeat")) or (
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
    source_schema = source.get("schema")
    db_schema = source_schema if isinstance(source_schema, str) else "public"
    transformer = None
    if entities is not None:
        transformer = entities.get((db_schema, table))
        if transformer is None:
            return Skip(f"table {db_schema}.{table} not mapped")
    try:
        version = parse_lsn(source)
        before_fields, after_fields = row_fields(schema)
        raw_before = convert_row(payload.get("before"), before_fields)
        after = convert_row(payload.get("after"), after_fields)
        if op != "d" and after is None:
            raise DecodeError(f"op {op} without an after image")
        partial = after is not None and UNAVAILABLE in after.values()
        after = without_unavailable(after)
        before = without_unavailable(raw_before)
        source_row = after if after is not None else before
        if source_row is None:
            raise DecodeError("no row image in before/after")
        key_row = message_key(raw_key)
        if transformer is not None and transformer.spec.key_columns:
            key_columns = transformer.spec.key_columns
        elif key_row is not None:
            key_columns = tuple(key_row)
        else:
            key_columns = ("id",)
        missing = [c for c in key_columns if source_row.get(c) is None]
        if missing:
            raise DecodeError(f"key column {missing[0]!r} missing from the row image")
        key_values = [source_row[c] for c in key_columns]
        if key_row is not None and (transformer is None or not transformer.spec.key_columns):
            key_fields = _fields((message_key_schema(raw_key)) or {})
            typed_key = [convert_value(key_row[c], key_fields.get(c, {})) for c in key_columns]
            if [key_text([v]) for v in typed_key] != [key_text([v]) for v in key_values]:
                raise DecodeError("the message key disagrees with the row's key columns")
        types = column_types(after_fields)
        if transformer is not None:
            before = transformer.image(before, partial=before is not None and len(before) < len(raw_before or {}),
                                       keep=key_columns)
            if after is not None:
                out = transformer.apply(after, partial=partial, keep=key_columns)
                if out is FILTERED:
                    # The row no longer belongs in the stores: it leaves them as a delete would.
                    op, after, partial = "d", None, False
                    before = before or {c: v for c, v in zip(key_columns, key_values, strict=True)}
                else:
                    assert isinstance(out, dict)
                    after = out
            declared = transformer.spec.declared_types
        else:
            declared = {}
        image = after if after is not None else before
        assert image is not None
        out_types = output_types(image, types, declared)
        if after is not None and before is not None:
            out_types = {**output_types(before, types, declared), **out_types}
        ts_ms = int(source.get("ts_ms") or payload.get("ts_ms") or 0)
    except (DecodeError, ExpressionError, ValueError, TypeError, KeyError, ArithmeticError, AttributeError,
            RecursionError, binascii.Error) as exc:
        return dead(f"{type(exc).__name__}: {str(exc)[:300]}")
    return ChangeRecord(
        source="postgres",
        entity=transformer.spec.name if transformer is not None else table,
        key=key_text(key_values),
        op=cast(Op, op),
        version=version,
        ts_ms=ts_ms,
        before=before,
        after=None if op == "d" else after,
        origin=(topic, partition, offset),
        partial=partial,
        key_columns=tuple(key_columns),
        types=out_types,
    )


def message_key_schema(raw_key: bytes | None) -> Mapping[str, Any] | None:
    if raw_key is None:
        return None
    key = orjson.loads(raw_key)
    return key.get("schema") if isinstance(key, dict) and isinstance(key.get("schema"), dict) else None
