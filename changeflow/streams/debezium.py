"""Decode Debezium's Kafka Connect JSON envelope (schemas enabled) into canonical change records.

Pure functions: bytes in, a ``Decoded`` value out; no I/O. Values are typed from the Connect schema
that travels with each message, so NUMERIC becomes an exact ``Decimal`` whatever Debezium's
``decimal.handling.mode`` (precise bytes, VariableScaleDecimal, string, double) and times become UTC
datetimes.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any, TypeVar, cast

import orjson

from changeflow.pipelines.transform import FILTERED, Transformer
from changeflow.pipelines.types import ColumnType, from_connect, from_value
from changeflow.schemas.json import exact_loads
from changeflow.schemas.json import loads as json_loads
from changeflow.streams.envelope import open_envelope, unwrap
from changeflow.streams.keys import key_text
from changeflow.streams.records import ChangeRecord, DeadLetter, Decoded, Op, Skip, bounded

# Ops of pgoutput beyond c/u/d/r: a logical decoding message is skipped, a truncate is a dead letter.
SPECIAL_OPS: dict[str, Skip | str] = {"m": Skip("logical decoding message"), "t": "truncate is not supported"}

UNAVAILABLE = "__debezium_unavailable_value"
# The placeholder as Debezium writes it into a bytea column (its bytes, base64 in JSON) and into arrays.
UNAVAILABLE_B64 = base64.b64encode(UNAVAILABLE.encode()).decode()
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
EPOCH_DATE = date(1970, 1, 1)
MIDNIGHT = datetime(2000, 1, 1)
_DAY_US = 86_400_000_000
_FLOAT_KINDS = frozenset({"float", "double", "float32", "float64"})
_FLOAT_WORDS = {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}
_INT64 = float(1 << 63)


class DecodeError(ValueError):
    """Raised inside this module only; callers receive a DeadLetter."""


class InexactError(DecodeError):
    """orjson read a number a float cannot hold (an integer beyond 64 bits, a NUMERIC as a JSON number):
    the message is parsed again with the exact parser. Raised only when ``convert_value(..., fast=True)``."""


# PostgreSQL's numeric holds at most 16383 digits after the point and 131072 before it: a scale beyond
# these is no value the source can have, and its plain-text form (the JSON stores write every digit) would
# take gigabytes; a dead letter, not a sink that runs out of memory on it.
MAX_DECIMAL_SCALE = 16383
MAX_DECIMAL_DIGITS = 131072 + 16383


def decimal_bytes_bound(precision: int) -> int:
    """The most bytes a two's-complement unscaled value of ``precision`` digits takes (10^p - 1 needs
    p·log2(10) bits, plus the sign)."""
    return (precision * 3322 // 1000 + 1) // 8 + 1


def _decimal_from_bytes(raw: str, scale: int, precision: int | None = None) -> Decimal:
    if not -MAX_DECIMAL_DIGITS <= scale <= MAX_DECIMAL_SCALE:
        raise DecodeError(f"Decimal scale {scale} is outside what PostgreSQL's numeric can hold")
    if len(raw) > MAX_DECIMAL_DIGITS:
        raise DecodeError(f"Decimal bytes of {len(raw)} characters are longer than any numeric")
    # Bounded by the column's precision before any conversion: an oversized value costs microseconds to
    # refuse, where turning it into digits costs seconds (the conversion is quadratic in its length).
    if precision is not None and len(raw) > 4 * ((decimal_bytes_bound(precision) + 2) // 3):
        raise DecodeError(f"Decimal bytes of {len(raw)} characters are longer than decimal({precision},{scale}) "
                          "can be")
    try:
        data = base64.b64decode(raw, validate=True)  # without validate, "!!!!" decodes to b"" (0.00)
    except ValueError:
        raise DecodeError(f"Decimal bytes are not base64: {raw[:40]!r}") from None
    unscaled = int.from_bytes(data, "big", signed=True)
    if precision is not None and unscaled and abs(unscaled).bit_length() > precision * 3322 // 1000 + 1:
        raise DecodeError(f"Decimal value has more digits than decimal({precision},{scale}) holds")
    # From text, not `scaleb`: arithmetic rounds to the context's 28 digits, a constructor never does
    # (an unconstrained numeric of 32 digits lost its last four that way).
    return Decimal(f"{unscaled}E{-scale}")


def _time(micros: int) -> time:
    if not 0 <= micros < _DAY_US:
        raise DecodeError(f"time of day {micros} µs is outside 00:00-23:59:59.999999")
    return (MIDNIGHT + timedelta(microseconds=micros)).time()


def convert_value(value: Any, schema: Mapping[str, Any], fast: bool = False) -> Any:
    """One Connect value typed by its schema; unknown logical types pass through unchanged.

    ``fast``: the value came from orjson, which reads an integer beyond 64 bits (and any number) as a
    float; a float where the schema wants no float raises ``InexactError`` so the caller re-parses exactly.
    """
    if value is None:
        return None
    if value == UNAVAILABLE:
        return UNAVAILABLE
    name = schema.get("name")
    kind = schema.get("type")
    if type(value) is float and fast and kind not in _FLOAT_KINDS and (
            kind is not None or (value.is_integer() and abs(value) >= _INT64)):
        raise InexactError(f"a {kind or 'schemaless'} value read as a float")
    if name is None:  # most columns: a plain Connect type
        return _by_kind(value, schema, kind, fast)
    if name == "org.apache.kafka.connect.data.Decimal":
        if isinstance(value, str):
            if value == UNAVAILABLE_B64:
                return UNAVAILABLE
            params = schema.get("parameters")
            scale = params.get("scale") if isinstance(params, dict) else None
            if scale is None:  # Connect always writes it: guessing 0 would scale every value wrong
                raise DecodeError("Decimal field without a scale parameter")
            precision = params.get("connect.decimal.precision")  # type: ignore[union-attr]
            return _decimal_from_bytes(value, int(scale), int(precision) if precision is not None else None)
        if isinstance(value, bool) or not isinstance(value, int | float | Decimal):
            raise DecodeError(f"Decimal value is {type(value).__name__}")
        return value if isinstance(value, Decimal) else Decimal(str(value))  # decimal.format=NUMERIC
    if name == "io.debezium.data.VariableScaleDecimal":
        if not isinstance(value, dict):
            raise DecodeError(f"VariableScaleDecimal value is {type(value).__name__}, not a struct")
        return _decimal_from_bytes(value["value"], int(value["scale"]))
    if name in ("io.debezium.time.MicroTimestamp",):
        return EPOCH + timedelta(microseconds=int(value))
    if name in ("io.debezium.time.Timestamp", "org.apache.kafka.connect.data.Timestamp"):
        return EPOCH + timedelta(milliseconds=int(value))
    if name == "io.debezium.time.NanoTimestamp":
        return EPOCH + timedelta(microseconds=int(value) // 1000)
    if name == "io.debezium.time.ZonedTimestamp":
        parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        if parsed.tzinfo is None:  # never read in the host's time zone
            raise DecodeError(f"ZonedTimestamp without an offset: {str(value)[:40]!r}")
        return parsed.astimezone(UTC)
    if name in ("io.debezium.time.Date", "org.apache.kafka.connect.data.Date"):
        return EPOCH_DATE + timedelta(days=int(value))
    if name == "io.debezium.time.MicroTime":
        return _time(int(value))
    if name in ("io.debezium.time.Time", "org.apache.kafka.connect.data.Time"):
        return _time(int(value) * 1000)
    if name == "io.debezium.time.NanoTime":
        return _time(int(value) // 1000)
    if name == "io.debezium.time.ZonedTime":
        parsed_time = time.fromisoformat(str(value).replace("Z", "+00:00"))
        if parsed_time.tzinfo is None:
            raise DecodeError(f"ZonedTime without an offset: {str(value)[:40]!r}")
        return datetime.combine(MIDNIGHT, parsed_time).astimezone(UTC).timetz()
    if name == "io.debezium.data.Json":
        return json_loads(value) if isinstance(value, str) else value
    return _by_kind(value, schema, kind, fast)


def _by_kind(value: Any, schema: Mapping[str, Any], kind: Any, fast: bool) -> Any:
    """A value whose schema names no logical type this module reads: typed by its Connect type."""
    if kind in _FLOAT_KINDS:
        if type(value) is float:
            return value
        if isinstance(value, str):  # Debezium writes NaN and ±Infinity as strings
            special = _FLOAT_WORDS.get(value)
            if special is None:
                raise DecodeError(f"{kind} value {value[:40]!r} is not a number")
            return special
        if isinstance(value, bool) or not isinstance(value, int | Decimal):
            raise DecodeError(f"{kind} value is {type(value).__name__}")
        return float(value)
    if kind == "bytes" and isinstance(value, str):
        if value == UNAVAILABLE_B64:
            return UNAVAILABLE
        return base64.b64decode(value, validate=True)
    if kind == "array" and isinstance(value, list):
        if value == [UNAVAILABLE]:
            return UNAVAILABLE
        items = schema.get("items") or {}
        if not isinstance(items, Mapping):
            raise DecodeError(f"array items schema is {type(items).__name__}, not an object")
        return [convert_value(v, items, fast) for v in value]
    return value


def _fields(row_schema: Mapping[str, Any] | None) -> dict[str, Mapping[str, Any]]:
    fields = (row_schema or {}).get("fields") or []
    return {f["field"]: f for f in fields if isinstance(f, dict) and isinstance(f.get("field"), str)}


# Values ``convert_value`` returns unchanged for a column whose schema names no logical type and whose
# Connect type is not a float, bytes or an array (a string, an integer, a boolean, null, and the TOAST
# placeholder, itself a string): such a column's value is taken as it is, without the call (measured:
# two thirds of the columns of a products change, 0.7 us each).
_PASSED = frozenset({str, int, bool, type(None)})
_PLAIN_COLUMNS: dict[int, tuple[Any, Any]] = {}
_T = TypeVar("_T")


def _per_object(cache: dict[int, tuple[Any, Any]], key: Any, compute: Callable[[Any], _T]) -> _T:
    """``compute(key)`` once per object: a cached schema's fields are the same object message after message.
    The entry holds the object, so its id is not reused while cached; what is returned is never mutated."""
    entry = cache.get(id(key))
    if entry is not None and entry[0] is key:
        return entry[1]
    value = compute(key)
    if len(cache) >= _MAX_SCHEMAS:
        cache.clear()
    cache[id(key)] = (key, value)
    return value


def _plain_columns(fields: Mapping[str, Mapping[str, Any]]) -> frozenset[str]:
    """The columns of ``fields`` whose values of the ``_PASSED`` types pass unchanged."""
    return frozenset(
        name for name, f in fields.items()
        if f.get("name") is None and f.get("type") not in _FLOAT_KINDS and f.get("type") not in ("bytes", "array")
    )


def convert_row(row: Mapping[str, Any] | None, fields: Mapping[str, Mapping[str, Any]],
                fast: bool = False) -> dict[str, Any] | None:
    if row is None:
        return None
    if not isinstance(row, dict):
        raise DecodeError(f"row image is {type(row).__name__}, not an object")
    plain = _per_object(_PLAIN_COLUMNS, fields, _plain_columns)
    return {name: value if name in plain and type(value) in _PASSED
            else convert_value(value, fields.get(name, {}), fast) for name, value in row.items()}


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
# The last few distinct schemas seen (newest first): most messages carry one of them.
_RECENT: list[tuple[bytes, dict[str, Any]]] = []
_MAX_RECENT = 8


def parse_message(raw: bytes, exact: bool = False) -> Any:
    """``orjson.loads(raw)``, with the Connect schema parsed once per distinct schema (see above).

    ``exact``: the payload is parsed with ``schemas.json.exact_loads`` instead (every integer an ``int``,
    a number a float cannot hold a ``Decimal``); used only after the fast parse met such a number.
    """
    loads = exact_loads if exact else orjson.loads
    if raw[:10] == _SCHEMA_PREFIX and raw[-1:] == b"}":
        for recent_bytes, recent in _RECENT:
            # The schema of a recent message, byte for byte, then the marker: the cut ``find`` would make (the
            # first marker after the schema's bytes, which held none), without searching and hashing them.
            end = 10 + len(recent_bytes)
            if raw.startswith(_PAYLOAD_MARK, end) and raw.startswith(recent_bytes, 10):
                try:
                    return {"schema": recent, "payload": loads(raw[end + len(_PAYLOAD_MARK):-1])}
                except ValueError:
                    return loads(raw)
        cut = raw.find(_PAYLOAD_MARK, 10)
        if cut > 0:
            schema_bytes = raw[10:cut]
            schema = _SCHEMAS.get(schema_bytes)
            try:
                if schema is None:
                    parsed = orjson.loads(schema_bytes)
                    if not isinstance(parsed, dict):
                        return loads(raw)
                    if len(_SCHEMAS) >= _MAX_SCHEMAS:
                        _SCHEMAS.clear()
                        _CACHED.clear()
                        _ROW_FIELDS.clear()
                        _RECENT.clear()
                    schema = _SCHEMAS[schema_bytes] = _CACHED[id(parsed)] = parsed
                out = {"schema": schema, "payload": loads(raw[cut + len(_PAYLOAD_MARK):-1])}
                _RECENT.insert(0, (schema_bytes, schema))
                del _RECENT[_MAX_RECENT:]
                return out
            except ValueError:  # orjson.JSONDecodeError and json.JSONDecodeError are ValueErrors
                pass
    return loads(raw)


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


# ``column_types`` per fields object (measured: 7 % of the decode stage's time went to recomputing them).
_TYPES_OF: dict[int, tuple[Any, Any]] = {}


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
    """The Debezium message key's columns (the primary key, or `message.key.columns`), numbers exact."""
    if raw_key is None:
        return None
    key = unwrap(orjson.loads(raw_key))
    if isinstance(key, dict) and float in map(type, key.values()):
        key = unwrap(exact_loads(raw_key))  # orjson reads an integer beyond 64 bits as a float
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

    Never raises: any exception while decoding one message makes that message a dead letter (an exception
    escaping here would stop the worker on the same message after every restart). The message is parsed
    with orjson; only when a value needs a number orjson cannot read exactly (``InexactError``) is it parsed
    again with the exact parser.
    """
    if raw_value is None:
        return Skip("tombstone")
    try:
        try:
            return _decode(raw_value, topic, partition, offset, raw_key, entities, exact=False)
        except InexactError:
            return _decode(raw_value, topic, partition, offset, raw_key, entities, exact=True)
    except Exception as exc:  # any exception is this message's dead letter, never the worker's
        return DeadLetter(raw_key, raw_value, topic, partition, offset, bounded(f"{type(exc).__name__}: {exc}"))


def _decode(raw_value: bytes, topic: str, partition: int, offset: int, raw_key: bytes | None,
            entities: Mapping[tuple[str, str], Transformer] | None, *, exact: bool) -> Decoded:
    def dead(reason: str) -> DeadLetter:
        return DeadLetter(raw_key, raw_value, topic, partition, offset, reason)

    try:
        message = parse_message(raw_value, exact)
    except ValueError as exc:
        return dead(f"not JSON: {exc}")
    envelope = open_envelope(message, raw_key, SPECIAL_OPS)
    if isinstance(envelope, Skip):
        return envelope
    if isinstance(envelope, str):
        return dead(envelope)
    payload, op, source, schema = envelope.payload, envelope.op, envelope.source, envelope.schema
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
    fast = not exact
    version = parse_lsn(source)
    before_fields, after_fields = row_fields(schema)
    raw_before = convert_row(payload.get("before"), before_fields, fast)
    after = convert_row(payload.get("after"), after_fields, fast)
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
    types = _per_object(_TYPES_OF, after_fields, column_types)
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


def message_key_text(raw_key: bytes | None, key_columns: Sequence[str] | None = None) -> str:
    """The canonical key text a change with this message key gets (``_decode``: the key columns' values, typed
    by the key's schema when it carries one), without its value: what the DLQ redaction reads from a dead
    letter whose value may be anything. ``key_columns``: the entity's declared key, which must then be
    columns of the message key (else the key is only in the row image: DecodeError)."""
    key_row = message_key(raw_key)
    if key_row is None:
        raise DecodeError("no message key")
    columns = tuple(key_columns) if key_columns else tuple(key_row)
    missing = [c for c in columns if key_row.get(c) is None]
    if missing:
        raise DecodeError(f"key column {missing[0]!r} not in the message key")
    key_fields = _fields(message_key_schema(raw_key) or {})
    return key_text([convert_value(key_row[c], key_fields.get(c, {})) for c in columns])


def message_key_schema(raw_key: bytes | None) -> Mapping[str, Any] | None:
    if raw_key is None:
        return None
    key = orjson.loads(raw_key)  # only the schema is read: its numbers never matter
    return key.get("schema") if isinstance(key, dict) and isinstance(key.get("schema"), dict) else None

