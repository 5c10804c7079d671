"""Every schema version is compatible both ways with its predecessor, and the wire format is Avro's."""

from __future__ import annotations

import io
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import fastavro
import pytest

import schemas

PAIRS = [
    (versions[i - 1], versions[i])
    for versions in schemas.registry().values()
    for i in range(1, len(versions))
]


def sample(entity: str) -> dict[str, Any]:
    rows: dict[str, dict[str, Any]] = {
        "products": {"id": 1, "sku": "S", "name": "n", "description": None, "category": "c",
                     "price": Decimal("12.34"), "stock": 3, "updated_at": datetime(2026, 1, 2, tzinfo=UTC)},
        "orders": {"id": "o", "user_id": "u", "status": "pending", "total_amount": Decimal("-0.01"),
                   "items": '[{"sku": "A"}]', "created_at": None, "updated_at": None},
        "payments": {"id": "p", "order_id": "o", "amount": Decimal("5.00"), "status": "captured",
                     "provider_ref": None, "created_at": None},
        "refunds": {"id": "r", "payment_id": "p", "order_id": "o", "amount": Decimal("1.00"), "reason": None,
                    "created_at": None},
        "users": {"id": "u", "email": "a@b.c", "name": "Ann", "status": "active", "profile": '{"city": "Oslo"}'},
    }
    return {"source": "postgres", "entity": entity, "key": "k", "op": "u", "version": 2**62 + 5,
            "ts_ms": 1_795_000_000_000, "before": None, "after": rows[entity]}


def test_every_entity_has_versions_and_pairs_are_checked() -> None:
    assert set(schemas.registry()) == {"products", "orders", "payments", "refunds", "users"}
    assert len(PAIRS) >= 5


@pytest.mark.parametrize(("old", "new"), PAIRS, ids=lambda sv: f"{sv.entity}-v{sv.version}")
def test_backward_and_forward_compatible_with_predecessor(
    old: schemas.SchemaVersion, new: schemas.SchemaVersion
) -> None:
    record = sample(old.entity)
    # backward: the new schema reads what the old one wrote
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, old.parsed, record)
    read_new: Any = fastavro.schemaless_reader(io.BytesIO(buf.getvalue()), old.parsed, new.parsed)
    added = set(read_new["after"]) - set(record["after"])
    assert {k: read_new["after"][k] for k in record["after"]} == record["after"]
    assert all(read_new["after"][k] is None for k in added)  # new fields take their defaults
    # forward: the old schema reads what the new one wrote
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, new.parsed, {**record, "present": ["id", "name"]})
    read_old = fastavro.schemaless_reader(io.BytesIO(buf.getvalue()), new.parsed, old.parsed)
    assert read_old["after"] == record["after"]  # type: ignore[index,call-overload]


def test_single_object_encoding_header_and_round_trip() -> None:
    record = sample("products")
    data = schemas.encode("products", record)
    assert data[:2] == b"\xc3\x01"
    assert data[2:10] == schemas.latest("products").fingerprint
    sv, decoded = schemas.decode(data)
    assert sv.version == schemas.latest("products").version
    assert decoded["after"] == record["after"]
    assert decoded["version"] == 2**62 + 5


def test_messages_written_with_an_old_version_still_decode() -> None:
    old = schemas.registry()["products"][0]
    buf = io.BytesIO()
    buf.write(b"\xc3\x01" + old.fingerprint)
    fastavro.schemaless_writer(buf, old.parsed, sample("products"))
    sv, decoded = schemas.decode(buf.getvalue())
    assert sv.version == old.version
    assert decoded["present"] is None


def test_unknown_fingerprint_and_missing_marker_are_errors() -> None:
    with pytest.raises(schemas.UnknownSchemaError, match="unknown schema fingerprint"):
        schemas.decode(b"\xc3\x01" + b"\x00" * 8 + b"\x02")
    with pytest.raises(schemas.UnknownSchemaError, match="missing C3 01 marker"):
        schemas.decode(b'{"json": true}')
