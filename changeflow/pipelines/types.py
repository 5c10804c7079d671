"""The column types a pipeline knows, and where they come from.

One small vocabulary sits between every source and every store: a source's type (the Connect schema
Debezium sends, the PostgreSQL catalog, a MongoDB value) becomes one of these, and each store maps these
to its own (ClickHouse columns, search mappings, Avro fields). So a new source type is one line here and a
new store is one mapping, never a list per pair.

Written as text in pipeline files and Avro annotations: ``int16``, ``int32``, ``int64``, ``float32``,
``float64``, ``bool``, ``string``, ``uuid``, ``enum``, ``json``, ``bytes``, ``date``, ``time``, ``timetz``,
``timestamp``, ``timestamptz``, ``interval``, ``decimal(P,S)``, ``decimal`` (unconstrained: every digit
kept, carried as text) and ``array<T>``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime, time
from decimal import Decimal
from typing import Any

SCALARS = frozenset({
    "int16", "int32", "int64", "float32", "float64", "bool", "string", "uuid", "enum", "json", "bytes",
    "date", "time", "timetz", "timestamp", "timestamptz", "interval", "decimal",
})
_DECIMAL = re.compile(r"^decimal\(\s*(\d+)\s*,\s*(\d+)\s*\)$")
_ARRAY = re.compile(r"^array<(.+)>$")


class UnknownTypeError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class ColumnType:
    kind: str  # one of SCALARS or "array"
    precision: int | None = None
    scale: int | None = None
    item: ColumnType | None = None

    def __str__(self) -> str:
        if self.kind == "array":
            return f"array<{self.item}>"
        if self.kind == "decimal" and self.precision is not None:
            return f"decimal({self.precision},{self.scale})"
        return self.kind


def parse_type(text: str) -> ColumnType:
    """``decimal(12,2)`` → ColumnType; raises UnknownTypeError naming the accepted forms."""
    t = text.strip()
    if t in SCALARS:
        return ColumnType(t)
    m = _DECIMAL.match(t)
    if m:
        precision, scale = int(m.group(1)), int(m.group(2))
        if not 1 <= precision <= 76 or scale > precision:
            raise UnknownTypeError(f"{text!r}: decimal(P,S) needs 1 <= P <= 76 and S <= P")
        return ColumnType("decimal", precision, scale)
    m = _ARRAY.match(t)
    if m:
        return ColumnType("array", item=parse_type(m.group(1)))
    raise UnknownTypeError(
        f"unknown type {text!r}; use one of {', '.join(sorted(SCALARS))}, decimal(P,S) or array<T>"
    )


def type_text(t: ColumnType | str) -> str:
    return str(t) if isinstance(t, ColumnType) else str(parse_type(t))


# --- from the Connect schema that Debezium sends ---------------------------------------------------

_CONNECT_NAMED = {
    "io.debezium.time.Date": "date",
    "org.apache.kafka.connect.data.Date": "date",
    "io.debezium.time.Time": "time",
    "io.debezium.time.MicroTime": "time",
    "io.debezium.time.NanoTime": "time",
    "org.apache.kafka.connect.data.Time": "time",
    "io.debezium.time.ZonedTime": "timetz",
    "io.debezium.time.Timestamp": "timestamp",
    "io.debezium.time.MicroTimestamp": "timestamp",
    "io.debezium.time.NanoTimestamp": "timestamp",
    "org.apache.kafka.connect.data.Timestamp": "timestamp",
    "io.debezium.time.ZonedTimestamp": "timestamptz",
    "io.debezium.time.MicroDuration": "interval",
    "io.debezium.time.Interval": "interval",
    "io.debezium.data.Uuid": "uuid",
    "io.debezium.data.Json": "json",
    "io.debezium.data.Enum": "enum",
    "io.debezium.data.EnumSet": "string",
    "io.debezium.data.Xml": "string",
    "io.debezium.data.VariableScaleDecimal": "decimal",
    "io.debezium.data.Bits": "bytes",
}
_CONNECT_PLAIN = {
    "int8": "int16", "int16": "int16", "int32": "int32", "int64": "int64", "float32": "float32",
    "float64": "float64", "float": "float64", "double": "float64", "boolean": "bool", "string": "string",
    "bytes": "bytes",
}


def from_connect(schema: Mapping[str, Any]) -> ColumnType:
    """The type of one field of a Connect schema (Debezium PostgreSQL); unknown names fall back to the
    plain Connect type, so a new Debezium logical type degrades to its carrier, never to an error."""
    name = schema.get("name")
    if name == "org.apache.kafka.connect.data.Decimal":
        params = schema.get("parameters") or {}
        scale = int(params.get("scale", 0))
        precision = params.get("connect.decimal.precision")
        if precision is None:
            return ColumnType("decimal")
        return ColumnType("decimal", int(precision), scale)
    if isinstance(name, str) and name in _CONNECT_NAMED:
        return parse_type(_CONNECT_NAMED[name])
    kind = schema.get("type")
    if kind == "array":
        items = schema.get("items")
        return ColumnType("array", item=from_connect(items if isinstance(items, Mapping) else {}))
    if kind in ("struct", "map"):
        return ColumnType("json")
    if isinstance(kind, str) and kind in _CONNECT_PLAIN:
        return ColumnType(_CONNECT_PLAIN[kind])
    return ColumnType("string")


# --- from the PostgreSQL catalog (`format_type` text, as `init` and `check` read it) -----------------

_PG = {
    "smallint": "int16", "integer": "int32", "bigint": "int64", "real": "float32", "double precision": "float64",
    "boolean": "bool", "text": "string", "uuid": "uuid", "json": "json", "jsonb": "json", "bytea": "bytes",
    "date": "date", "time without time zone": "time", "time with time zone": "timetz",
    "timestamp without time zone": "timestamp", "timestamp with time zone": "timestamptz",
    "interval": "interval", "numeric": "decimal", "money": "decimal(19,2)", "xml": "string", "inet": "string",
    "cidr": "string", "macaddr": "string", "citext": "string", "oid": "int64", "smallserial": "int16",
    "serial": "int32", "bigserial": "int64",
}
_PG_PARAM = re.compile(r"^(character varying|character|varchar|char|bit varying|bit|numeric|"
                       r"time(?:stamp)? without time zone|time(?:stamp)? with time zone|time|timestamp)"
                       r"(?:\((\d+)(?:,(\d+))?\))?(.*)$")


def from_postgres(format_type: str, *, is_enum: bool = False) -> ColumnType:
    """The type of a column from ``pg_catalog.format_type`` text (``numeric(12,2)``, ``text[]``, ...)."""
    text = format_type.strip()
    if text.endswith("[]"):
        return ColumnType("array", item=from_postgres(text[:-2], is_enum=is_enum))
    if is_enum:
        return ColumnType("enum")
    if text in _PG:
        return parse_type(_PG[text])
    m = _PG_PARAM.match(text)
    if m:
        base, p, s, rest = m.group(1), m.group(2), m.group(3), m.group(4).strip()
        if base == "numeric":
            return ColumnType("decimal") if p is None else ColumnType("decimal", int(p), int(s or 0))
        if base.startswith(("character", "varchar", "char")):
            return ColumnType("string")
        if base.startswith("bit"):
            return ColumnType("bytes")
        full = f"{base} {rest}".strip() if rest else base
        if full in _PG:
            return parse_type(_PG[full])
        if base in ("time", "timestamp"):
            return parse_type(_PG[f"{base} without time zone"])
    # Domains, geometric and other exotic types arrive from Debezium as text.
    return ColumnType("string")


# --- from a Python value (MongoDB documents, fields a hook adds) ------------------------------------


def from_value(value: Any) -> ColumnType | None:
    """The narrowest type that holds ``value``; None for None (nothing to learn from it)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return ColumnType("bool")
    if isinstance(value, int):
        return ColumnType("int64") if -(2**63) <= value < 2**63 else ColumnType("decimal")
    if isinstance(value, float):
        return ColumnType("float64")
    if isinstance(value, Decimal):
        return ColumnType("decimal")
    if isinstance(value, str):
        return ColumnType("string")
    if isinstance(value, bytes):
        return ColumnType("bytes")
    if isinstance(value, datetime):
        return ColumnType("timestamptz")
    if isinstance(value, date):
        return ColumnType("date")
    if isinstance(value, time):
        return ColumnType("time")
    return ColumnType("json")


# Widenings a running pipeline accepts without a new table: the stores' columns can hold both.
_WIDER = {
    ("int16", "int32"), ("int16", "int64"), ("int32", "int64"), ("float32", "float64"),
    ("enum", "string"), ("uuid", "string"),
}


def widens(old: ColumnType, new: ColumnType) -> bool:
    return old == new or (old.kind, new.kind) in _WIDER
