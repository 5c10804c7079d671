"""Canonical schemas are generated from column types and evolve compatibly, or refuse to."""

from __future__ import annotations

import io
from datetime import UTC, date, datetime, time
from decimal import Decimal
from typing import Any

import fastavro
import pytest

from changeflow import schemas
from changeflow.pipelines.types import parse_type

COLUMNS = {
    "id": "int64", "small": "int16", "amount": "decimal(12,2)", "exact": "decimal", "ratio": "float64",
    "flag": "bool", "name": "string", "uid": "uuid", "doc": "json", "blob": "bytes", "day": "date",
    "at": "time", "at_tz": "timetz", "ts": "timestamptz", "span": "interval", "tags": "array<string>",
    'we"ird`\\name': "string",
}
ROW: dict[str, Any] = {
    "id": 2**62, "small": -3, "amount": Decimal("-0.01"), "exact": Decimal("123456789012345678901234567890.000000001"),
    "ratio": float("nan"), "flag": True, "name": "ü", "uid": "0b6f2c9e-3d1a-4c55-9a7e-2f1d0c3b4a59",
    "doc": {"n": [1, {"x": None}]}, "blob": b"\x00\xff", "day": date(1969, 12, 31), "at": time(23, 59, 59, 999999),
    "at_tz": "10:00:00+02:00", "ts": datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC), "span": 86_400_000_000,
    "tags": ["a", None], 'we"ird`\\name': "kept",
}


def typed(columns: dict[str, str]) -> dict[str, Any]:
    return {n: parse_type(t) for n, t in columns.items()}


def record(after: dict[str, Any] | None) -> dict[str, Any]:
    return {"source": "postgres", "entity": "things", "key": "1", "op": "c", "version": 2**63 - 1,
            "ts_ms": 1_795_000_000_000, "before": None, "after": after, "present": None}


def test_every_type_round_trips_exactly_and_names_survive() -> None:
    book = schemas.SchemaBook()
    sv = book.for_columns("things", typed(COLUMNS), ["id"])
    got_sv, got = schemas.decode(schemas.encode(sv, record(ROW)), book.lookup)
    assert got_sv is sv
    after = got["after"]
    nan = after.pop("ratio")
    assert nan != nan  # NaN stays a float NaN
    assert after == {k: v for k, v in ROW.items() if k != "ratio"}
    assert sv.columns['we"ird`\\name'] == parse_type("string")


def test_new_column_is_a_new_version_readable_both_ways() -> None:
    published: list[schemas.SchemaVersion] = []
    book = schemas.SchemaBook(publish=published.append)
    v1 = book.for_columns("things", typed({"id": "int64", "name": "string"}), ["id"])
    assert book.for_columns("things", typed({"id": "int64"}), ["id"]) is v1  # a subset needs no version
    v2 = book.for_columns("things", typed({"id": "int64", "name": "string", "price": "decimal(10,2)"}), ["id"])
    assert (v1.version, v2.version) == (1, 2) and published == [v1, v2]
    assert list(v2.columns) == ["id", "name", "price"]
    # backward: the new schema reads what the old one wrote; forward: the old reads the new
    old = record({"id": 1, "name": "a"})
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, v1.parsed, {**old, "after": {"c0": 1, "c1": "a"}})
    read: Any = fastavro.schemaless_reader(io.BytesIO(buf.getvalue()), v1.parsed, v2.parsed)
    assert read["after"] == {"c0": 1, "c1": "a", "c2": None}
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, v2.parsed, {**old, "after": {"c0": 1, "c1": "a", "c2": Decimal("1.50")}})
    read = fastavro.schemaless_reader(io.BytesIO(buf.getvalue()), v2.parsed, v1.parsed)
    assert read["after"] == {"c0": 1, "c1": "a"}


def test_widening_is_accepted_and_an_incompatible_change_is_refused() -> None:
    book = schemas.SchemaBook()
    book.for_columns("things", typed({"id": "int32", "n": "string"}), ["id"])
    wider = book.for_columns("things", typed({"id": "int64", "n": "string"}), ["id"])
    assert wider.columns["id"] == parse_type("int64")
    assert book.for_columns("things", typed({"id": "int32"}), ["id"]) is wider  # narrower values still fit
    with pytest.raises(schemas.IncompatibleChangeError, match="column 'n' of things changed type from string to int64"):
        book.for_columns("things", typed({"id": "int64", "n": "int64"}), ["id"])


def test_versions_travel_as_json_for_other_readers() -> None:
    sv = schemas.make_version("things", 3, typed(COLUMNS), ["id", "uid"])
    again = schemas.SchemaVersion.from_json(sv.as_json())
    assert (again.fingerprint, again.version, again.key_columns, again.columns) == (
        sv.fingerprint, 3, ("id", "uid"), sv.columns)


@pytest.mark.parametrize("data", [b"", b"\xc3\x01short", b"not avro at all", b"\xc3\x01" + bytes(8) + b"\x00"])
def test_undecodable_bytes_raise_unknown_schema(data: bytes) -> None:
    with pytest.raises(schemas.UnknownSchemaError):
        schemas.decode(data, schemas.SchemaBook().lookup)


def test_a_value_that_does_not_fit_its_column_names_the_column() -> None:
    sv = schemas.make_version("things", 1, typed({"id": "int64", "amount": "decimal(12,2)"}), ["id"])
    with pytest.raises(ValueError, match=r"things.amount: 'abc' is not a decimal number"):
        schemas.encode(sv, record({"id": 1, "amount": "abc"}))


# --- a first version from the catalog --------------------------------------------------------------

def _catalog_pipeline(entity_yaml: str) -> Any:
    from changeflow.pipelines.load import parse

    return parse("name: cat\nsources:\n  postgres: {database: shop, schemas: [sales]}\nentities:\n" + entity_yaml)


def _lines_table() -> Any:
    from changeflow.pipelines.catalog import Column, Table

    return Table("sales", "Order Lines", (
        Column("order_id", "uuid", nullable=False), Column("line no", "integer", nullable=False),
        Column("qty", "numeric(10,3)"), Column("secret", "text"), Column("email", "character varying(80)"),
        Column("mood", "\"Mood\"", is_enum=True), Column("tags", "text[]"), Column("at", "timestamp with time zone"),
    ), primary_key=("order_id", "line no"))


def test_catalog_version_follows_the_field_policy_and_derived_types() -> None:
    p = _catalog_pipeline(
        "  lines:\n    table: sales.Order Lines\n    fields: {drop: [secret], hash: [email], salt: '${env:X}'}\n"
        "    derive:\n      qty2: {expr: qty * 2, type: 'decimal(12,3)'}\n")
    planned = schemas.catalog_columns(p.entities["lines"], _lines_table())
    assert planned is not None
    columns, key = planned
    assert key == ("order_id", "line no")
    assert {n: str(t) for n, t in columns.items()} == {
        "order_id": "uuid", "line no": "int32", "qty": "decimal(10,3)", "email": "string", "mood": "enum",
        "tags": "array<string>", "at": "timestamptz", "qty2": "decimal(12,3)",
    }


def test_catalog_version_with_allow_keeps_the_key_and_a_declared_key_wins() -> None:
    p = _catalog_pipeline("  lines:\n    table: sales.Order Lines\n    key: [order_id]\n"
                          "    fields: {allow: [qty]}\n")
    planned = schemas.catalog_columns(p.entities["lines"], _lines_table())
    assert planned is not None
    assert list(planned[0]) == ["order_id", "qty"] and planned[1] == ("order_id",)


def test_no_catalog_version_when_a_hook_shapes_the_row_or_there_is_no_key() -> None:
    from changeflow.pipelines.catalog import Column, Table

    hooked = _catalog_pipeline("  lines:\n    table: sales.Order Lines\n    hook: 'json:loads'\n")
    assert schemas.catalog_columns(hooked.entities["lines"], _lines_table()) is None
    keyless = _catalog_pipeline("  log:\n    table: sales.log\n")
    assert schemas.catalog_columns(keyless.entities["log"], Table("sales", "log", (Column("at", "text"),))) is None


def test_a_version_published_by_an_earlier_release_still_decodes_and_is_superseded() -> None:
    """A version's own Avro schema is what decodes its records, not one regenerated from its columns; a
    writer meeting a version without a field it writes (here `carried`) publishes the same columns anew."""
    import json as stdjson

    current = schemas.make_version("things", 3, typed({"id": "int64", "name": "string"}), ["id"])
    old_raw = {**current.raw, "fields": [f for f in current.raw["fields"] if f["name"] != "carried"]}
    old = schemas.SchemaVersion.from_json(stdjson.dumps({"entity": "things", "version": 3, "key": ["id"],
                                                       "columns": {"id": "int64", "name": "string"},
                                                       "avro": old_raw}))
    assert old.fingerprint != current.fingerprint
    buf = io.BytesIO()
    buf.write(schemas.MAGIC + old.fingerprint)
    fastavro.schemaless_writer(buf, old.parsed, {**record(None), "after": {"c0": 1, "c1": "x"}})
    book = schemas.SchemaBook()
    book.add([old])
    decoded_sv, decoded = schemas.decode(buf.getvalue(), book.lookup)
    assert decoded_sv is old and decoded["after"] == {"id": 1, "name": "x"}

    published: list[schemas.SchemaVersion] = []
    book = schemas.SchemaBook(publish=published.append)
    book.add([old])
    newer = book.for_columns("things", typed({"id": "int64", "name": "string"}), ["id"])
    assert (newer.version, newer.columns, newer.fingerprint) == (4, old.columns, schemas.make_version(
        "things", 4, typed({"id": "int64", "name": "string"}), ["id"]).fingerprint)
    assert published == [newer]
    assert book.for_columns("things", typed({"id": "int64"}), ["id"]) is newer and published == [newer]


def test_two_entities_of_the_same_shape_never_share_a_fingerprint() -> None:
    """Avro's fingerprint ignores attributes (the real column names): the row record's name keeps the
    entities apart, so a record is never decoded with another entity's column names."""
    book = schemas.SchemaBook()
    payments = book.for_columns("payments", typed({"id": "int64", "amount": "decimal(12,2)"}), ["id"])
    refunds = book.for_columns("refunds", typed({"id": "int64", "sum": "decimal(12,2)"}), ["id"])
    assert payments.fingerprint != refunds.fingerprint
    data = schemas.encode(refunds, {**record({"id": 7, "sum": Decimal("1.50")}), "entity": "refunds"})
    sv, decoded = schemas.decode(data, book.lookup)
    assert sv is refunds and decoded["after"] == {"id": 7, "sum": Decimal("1.50")}


def test_no_catalog_version_for_a_type_whose_connect_form_the_catalog_cannot_tell() -> None:
    """bit(1) arrives as a boolean, hstore and point as JSON, money without a precision: seeding those from
    the catalog text would make every change a dead letter, so the first change makes the version."""
    from changeflow.pipelines.catalog import Column, Table

    p = _catalog_pipeline("  t:\n    table: sales.t\n")
    for odd in ("bit(1)", "hstore", "point", "money"):
        table = Table("sales", "t", (Column("id", "bigint"), Column("x", odd)), primary_key=("id",))
        assert schemas.catalog_columns(p.entities["t"], table) is None, odd
    declared = _catalog_pipeline("  t:\n    table: sales.t\n    columns: {x: bool}\n")
    table = Table("sales", "t", (Column("id", "bigint"), Column("x", "bit(1)")), primary_key=("id",))
    planned = schemas.catalog_columns(declared.entities["t"], table)
    assert planned is not None and str(planned[0]["x"]) == "bool"
