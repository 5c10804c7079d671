"""Avro schemas of the canonical records, and their wire format.

Canonical topics carry Avro in the specification's single-object encoding: the marker ``C3 01``, the
schema's 8-byte CRC-64-AVRO fingerprint (little-endian), then the binary body. Any consumer holding
this folder can decode a message without a schema registry. Each entity keeps every version as
``schemas/<entity>/v<N>.avsc``; the newest is used for writing, all are accepted for reading.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from functools import cache
from pathlib import Path
from typing import Any

import fastavro
from fastavro.schema import fingerprint, parse_schema, to_parsing_canonical_form

SCHEMA_DIR = Path(__file__).parent
MAGIC = b"\xc3\x01"


class UnknownSchemaError(ValueError):
    pass


@dataclass(frozen=True)
class SchemaVersion:
    entity: str
    version: int
    path: Path
    parsed: Any
    fingerprint: bytes
    # Row fields typed `{"type": "string", "logicalType": "json"}`: free-form JSON (jsonb, sub-documents)
    # carried as JSON text on the wire and as Python values everywhere else.
    json_fields: frozenset[str] = frozenset()
    # The row record's declared fields; anything else travels in its `extra` map (when it has one).
    row_fields: frozenset[str] = frozenset()
    # Row fields with Avro's decimal logical type → their scale.
    decimal_fields: dict[str, int] = field(default_factory=dict)


def _decimal_fields(raw: dict[str, Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for f in raw.get("fields", []):
        if f["name"] != "before":
            continue
        for branch in f["type"] if isinstance(f["type"], list) else [f["type"]]:
            if isinstance(branch, dict) and branch.get("type") == "record":
                for col in branch["fields"]:
                    for t in col["type"] if isinstance(col["type"], list) else [col["type"]]:
                        if isinstance(t, dict) and t.get("logicalType") == "decimal":
                            out[col["name"]] = int(t.get("scale", 0))
    return out


def _coerce_decimals(row: dict[str, Any] | None, sv: SchemaVersion) -> dict[str, Any] | None:
    """NUMERIC decoded in `decimal.handling.mode=string` or `double` arrives as text or float: make it the
    exact Decimal the schema declares (a value that is not a number is an error for the caller)."""
    if row is None or not sv.decimal_fields:
        return row
    out = dict(row)
    for name, scale in sv.decimal_fields.items():
        value = out.get(name)
        if value is None or isinstance(value, Decimal):
            continue
        try:
            out[name] = Decimal(str(value)).quantize(Decimal(1).scaleb(-scale))
        except InvalidOperation:
            raise ValueError(f"{sv.entity}.{name}: {value!r} is not a decimal number") from None
    return out


def _row_fields(raw: dict[str, Any]) -> frozenset[str]:
    for f in raw.get("fields", []):
        if f["name"] == "before":
            for branch in f["type"] if isinstance(f["type"], list) else [f["type"]]:
                if isinstance(branch, dict) and branch.get("type") == "record":
                    return frozenset(col["name"] for col in branch["fields"])
    return frozenset()


def _json_fields(raw: dict[str, Any]) -> frozenset[str]:
    names: set[str] = set()
    for f in raw.get("fields", []):
        if f["name"] != "before":
            continue
        for branch in f["type"] if isinstance(f["type"], list) else [f["type"]]:
            if isinstance(branch, dict) and branch.get("type") == "record":
                for col in branch["fields"]:
                    types = col["type"] if isinstance(col["type"], list) else [col["type"]]
                    if any(isinstance(t, dict) and t.get("logicalType") == "json" for t in types):
                        names.add(col["name"])
    return frozenset(names)


def _load(path: Path) -> SchemaVersion:
    raw = json.loads(path.read_text())
    parsed = parse_schema(raw)
    fp = bytes.fromhex(fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO"))
    return SchemaVersion(
        path.parent.name, int(path.stem.lstrip("v")), path, parsed, fp, _json_fields(raw), _row_fields(raw),
        _decimal_fields(raw),
    )


@cache
def registry() -> dict[str, list[SchemaVersion]]:
    """entity → its schema versions, oldest first."""
    out: dict[str, list[SchemaVersion]] = {}
    for path in sorted(SCHEMA_DIR.glob("*/v*.avsc")):
        sv = _load(path)
        out.setdefault(sv.entity, []).append(sv)
    for versions in out.values():
        versions.sort(key=lambda v: v.version)
    return out


@cache
def by_fingerprint() -> dict[bytes, SchemaVersion]:
    return {sv.fingerprint: sv for versions in registry().values() for sv in versions}


def latest(entity: str) -> SchemaVersion:
    try:
        return registry()[entity][-1]
    except KeyError:
        raise UnknownSchemaError(f"no schema for entity {entity!r} under {SCHEMA_DIR}") from None


def _map_json(row: dict[str, Any] | None, fields: frozenset[str], fn: Any) -> dict[str, Any] | None:
    if row is None or not fields:
        return row
    return {k: (fn(v) if k in fields and v is not None else v) for k, v in row.items()}


def _split_extra(row: dict[str, Any] | None, sv: SchemaVersion) -> dict[str, Any] | None:
    """Columns the schema does not declare move into `extra` (JSON text) instead of being dropped."""
    if row is None or "extra" not in sv.row_fields:
        return row
    undeclared = {k: v for k, v in row.items() if k not in sv.row_fields}
    if not undeclared:
        return row
    kept = {k: v for k, v in row.items() if k in sv.row_fields}
    kept["extra"] = {k: _dump_json(v) for k, v in undeclared.items()}
    return kept


def _merge_extra(row: dict[str, Any] | None) -> dict[str, Any] | None:
    if row is None or "extra" not in row:
        return row
    extra = row.pop("extra") or {}
    row.update({k: json.loads(v) for k, v in extra.items() if k not in row})
    return row


def encode(entity: str, record: dict[str, Any]) -> bytes:
    sv = latest(entity)
    record = {
        **record,
        "before": _split_extra(_map_json(_coerce_decimals(record.get("before"), sv), sv.json_fields, _dump_json), sv),
        "after": _split_extra(_map_json(_coerce_decimals(record.get("after"), sv), sv.json_fields, _dump_json), sv),
    }
    buf = io.BytesIO()
    buf.write(MAGIC)
    buf.write(sv.fingerprint)
    fastavro.schemaless_writer(buf, sv.parsed, record)
    return buf.getvalue()


def decode(data: bytes) -> tuple[SchemaVersion, dict[str, Any]]:
    """Decode with the writer's schema, resolved into the newest schema of its entity."""
    if data[:2] != MAGIC or len(data) < 10:
        raise UnknownSchemaError("not Avro single-object encoding (missing C3 01 marker)")
    sv = by_fingerprint().get(data[2:10])
    if sv is None:
        raise UnknownSchemaError(f"unknown schema fingerprint {data[2:10].hex()}")
    reader = latest(sv.entity)
    record: dict[str, Any] = fastavro.schemaless_reader(  # type: ignore[assignment]
        io.BytesIO(data[10:]), sv.parsed, reader.parsed
    )
    record["before"] = _merge_extra(_map_json(record.get("before"), reader.json_fields, json.loads))
    record["after"] = _merge_extra(_map_json(record.get("after"), reader.json_fields, json.loads))
    return sv, record


def _dump_json(value: Any) -> str:
    from streams.json import dumps

    return dumps(value).decode()
