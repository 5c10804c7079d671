"""Avro schemas of the canonical records, and their wire format.

Canonical topics carry Avro in the specification's single-object encoding: the marker ``C3 01``, the
schema's 8-byte CRC-64-AVRO fingerprint (little-endian), then the binary body. Any consumer holding
this folder can decode a message without a schema registry. Each entity keeps every version as
``schemas/<entity>/v<N>.avsc``; the newest is used for writing, all are accepted for reading.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
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


def _load(path: Path) -> SchemaVersion:
    raw = json.loads(path.read_text())
    parsed = parse_schema(raw)
    fp = bytes.fromhex(fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO"))
    return SchemaVersion(path.parent.name, int(path.stem.lstrip("v")), path, parsed, fp)


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


def encode(entity: str, record: dict[str, Any]) -> bytes:
    sv = latest(entity)
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
    record = fastavro.schemaless_reader(io.BytesIO(data[10:]), sv.parsed, reader.parsed)
    return sv, record  # type: ignore[return-value]
