"""The PostgreSQL decoder on Debezium envelopes: every op, tombstones, types, and bad input."""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import pytest

from changeflow.streams.debezium import UNAVAILABLE, convert_value, decode_postgres
from changeflow.streams.records import ChangeRecord, DeadLetter, Skip
from tests.unit.commerce import POSTGRES_ENTITIES
from tests.unit.envelopes import decimal_bytes, encoded, envelope, product_row

POS: dict[str, Any] = {"topic": "commerce.public.products", "partition": 2, "offset": 41}


def _key_of(message: bytes | None) -> bytes | None:
    """The Debezium message key of an envelope: its row's id, as Debezium derives it from the primary key."""
    import orjson

    try:
        payload = orjson.loads(message or b"null").get("payload", {})
    except (orjson.JSONDecodeError, AttributeError, TypeError):
        return b'{"id":1}'  # what arrived with a message that is not an envelope: kept as it came
    row = payload.get("after") or payload.get("before") if isinstance(payload, dict) else None
    return orjson.dumps({"id": row["id"]}) if isinstance(row, dict) and "id" in row else b'{"id":1}'


def decode(message: bytes | None) -> object:
    return decode_postgres(message, entities=POSTGRES_ENTITIES, raw_key=_key_of(message), **POS)


def test_insert_becomes_canonical_record_with_exact_price_and_no_internal_notes() -> None:
    result = decode(encoded(envelope("c", None, product_row(7, price_cents=1999), lsn=33_554_432)))
    assert isinstance(result, ChangeRecord)
    assert (result.source, result.entity, result.key, result.op) == ("postgres", "products", "7", "c")
    assert result.version == 33_554_432
    assert result.ts_ms == 1_795_000_000_000
    assert result.kafka_key == "products:7"
    assert result.before is None
    assert result.after == {
        "id": 7,
        "sku": "SKU-7",
        "name": "quiet kettle",
        "description": "A quiet kettle for every home.",
        "category": "kitchen",
        "price": Decimal("19.99"),
        "stock": 5,
        "updated_at": datetime(2026, 11, 24, 10, 15, 30, 123456, tzinfo=UTC),
    }
    assert str(result.after["price"]) == "19.99"
    assert result.origin == ("commerce.public.products", 2, 41)


@pytest.mark.parametrize(("cents", "price"), [(0, "0.00"), (5, "0.05"), (100, "1.00"), (123456789, "1234567.89")])
def test_price_is_exact_dollars(cents: int, price: str) -> None:
    result = decode(encoded(envelope("c", None, product_row(1, price_cents=cents))))
    assert isinstance(result, ChangeRecord)
    assert result.after is not None
    assert str(result.after["price"]) == price


def test_update_carries_before_and_after_images() -> None:
    before = product_row(3, price_cents=1000)
    after = product_row(3, price_cents=1250, stock=4)
    result = decode(encoded(envelope("u", before, after, lsn=40_000_000)))
    assert isinstance(result, ChangeRecord)
    assert result.op == "u"
    assert result.before is not None and result.after is not None
    assert result.before["price"] == Decimal("10.00")
    assert result.after["price"] == Decimal("12.50")
    assert result.after["stock"] == 4
    assert "internal_notes" not in result.before


def test_delete_with_default_replica_identity_keeps_key_and_has_no_after() -> None:
    before = {k: None for k in product_row(9)} | {"id": 9, "price_cents": 0, "stock": 0, "sku": "", "name": "",
                                                  "updated_at": "1970-01-01T00:00:00Z"}
    result = decode(encoded(envelope("d", before, None, lsn=50_000_000)))
    assert isinstance(result, ChangeRecord)
    assert (result.op, result.key, result.after, result.is_delete) == ("d", "9", None, True)
    assert result.version == 50_000_000


def test_tombstone_after_delete_is_skipped() -> None:
    assert decode(None) == Skip("tombstone")


def test_snapshot_read_is_op_r() -> None:
    result = decode(encoded(envelope("r", None, product_row(2), snapshot="true")))
    assert isinstance(result, ChangeRecord)
    assert result.op == "r"
    assert result.after is not None and result.after["sku"] == "SKU-2"


def test_unmapped_table_is_skipped_not_dead_lettered() -> None:
    result = decode(encoded(envelope("c", None, product_row(1), table="audit_log")))
    assert result == Skip("table public.audit_log not mapped")


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"\x00\x01 not json", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (encoded({"payload": {"op": "x", "source": {"table": "products", "lsn": 1}}, "schema": {}}), "unknown op 'x'"),
        (encoded({"payload": {"op": "c", "after": {"id": 1}}, "schema": {}}), "source block missing"),
    ],
)
def test_malformed_messages_become_dead_letters_with_original_bytes_and_position(raw: bytes, reason: str) -> None:
    result = decode(raw)
    assert isinstance(result, DeadLetter)
    assert reason in result.reason
    assert result.raw_value == raw
    assert result.raw_key == b'{"id":1}'
    assert (result.topic, result.partition, result.offset) == ("commerce.public.products", 2, 41)


def test_missing_lsn_is_a_dead_letter() -> None:
    message = envelope("c", None, product_row(1))
    del message["payload"]["source"]["lsn"]
    result = decode(encoded(message))
    assert isinstance(result, DeadLetter)
    assert "source.lsn missing" in result.reason


def test_row_without_primary_key_is_a_dead_letter() -> None:
    row = product_row(1)
    del row["id"]
    result = decode(encoded(envelope("c", None, row)))
    assert isinstance(result, DeadLetter)
    assert "key column 'id' missing from the row image" in result.reason


# --- logical types ------------------------------------------------------------------------------------
DECIMAL_SCHEMA = {"type": "bytes", "name": "org.apache.kafka.connect.data.Decimal", "parameters": {"scale": "2"}}


@pytest.mark.parametrize("unscaled", [0, 1, 12345, -12345, -1, 2**70, -(2**70)])
def test_precise_decimal_bytes_including_negatives(unscaled: int) -> None:
    assert convert_value(decimal_bytes(unscaled), DECIMAL_SCHEMA) == Decimal(unscaled).scaleb(-2)


def test_variable_scale_decimal() -> None:
    schema = {"type": "struct", "name": "io.debezium.data.VariableScaleDecimal"}
    assert convert_value({"scale": 3, "value": decimal_bytes(-1234567)}, schema) == Decimal("-1234.567")


def test_micro_timestamp_and_date_and_zoned_timestamp() -> None:
    assert convert_value(1_700_000_000_123_456, {"type": "int64", "name": "io.debezium.time.MicroTimestamp"}) == (
        datetime(2023, 11, 14, 22, 13, 20, 123456, tzinfo=UTC)
    )
    assert convert_value(19_000, {"type": "int32", "name": "io.debezium.time.Date"}) == date(2022, 1, 8)
    zoned = {"type": "string", "name": "io.debezium.time.ZonedTimestamp"}
    assert convert_value("2026-11-24T12:00:00+02:00", zoned) == (
        datetime(2026, 11, 24, 10, 0, tzinfo=UTC)
    )


def test_json_column_is_parsed() -> None:
    assert convert_value('[{"sku": "A", "qty": 2}]', {"type": "string", "name": "io.debezium.data.Json"}) == [
        {"sku": "A", "qty": 2}
    ]


def test_unavailable_placeholder_is_kept_as_marker_for_the_entity_transform() -> None:
    assert convert_value(UNAVAILABLE, {"type": "string"}) == UNAVAILABLE


def test_incremental_snapshot_read_is_ordered_by_the_stream_position_in_sequence() -> None:
    message = envelope("r", None, product_row(5), snapshot="incremental")
    source = message["payload"]["source"]
    source["lsn"] = None
    source["txId"] = None
    source["sequence"] = '["27565136","27565200"]'
    result = decode(encoded(message))
    assert isinstance(result, ChangeRecord)
    assert (result.op, result.version) == ("r", 27_565_200)


def test_incremental_snapshot_read_without_any_position_is_a_dead_letter() -> None:
    message = envelope("r", None, product_row(5), snapshot="incremental")
    message["payload"]["source"]["lsn"] = None
    message["payload"]["source"]["sequence"] = "[null,null]"
    result = decode(encoded(message))
    assert isinstance(result, DeadLetter)
    assert "source.lsn missing" in result.reason


@pytest.mark.parametrize("raw", [
    b'{"schema":{"type":"struct","fields":[]},"payload":{"op":"c","x":1}}',
    # the marker inside the schema (a parameter named "payload"): the cut fails, the whole message parses
    b'{"schema":{"type":"struct","parameters":{"a":"b","payload":"p"}},"payload":{"op":"c"}}',
    # a column named "payload" inside the payload: the first marker is the envelope's
    b'{"schema":{"type":"struct"},"payload":{"after":{"id":1,"payload":"x"},"op":"c"}}',
    b'{"schema":null,"payload":{"op":"c"}}',
    b'{"schema":{"type":"struct"},"payload":{"op":"c"}} ',
    b'{"schema":{"type":"struct"},"payload":{"op":"c"}',
    b'{"payload":{"op":"c"},"schema":{"type":"struct"}}',
    b'{"schema":[1,2],"payload":{"op":"c"}}',
    b'{"schema":"s\\",\\"payload\\":","payload":{"op":"c"}}',
])
def test_parse_message_is_orjson_loads_whatever_the_bytes(raw: bytes) -> None:
    """The cached-schema shortcut gives exactly what a full parse gives, or the same error."""
    for _ in range(2):  # the second time from the schema cache
        assert_parses_as_orjson(raw)


def assert_parses_as_orjson(raw: bytes) -> None:
    import orjson

    from changeflow.streams.debezium import parse_message

    try:
        expected = orjson.loads(raw)
    except orjson.JSONDecodeError:
        with pytest.raises(orjson.JSONDecodeError):
            parse_message(raw)
        return
    assert parse_message(raw) == expected, raw


def test_parse_message_from_recent_schemas_is_orjson_loads_for_every_neighbour() -> None:
    """Messages whose schema is, starts with, or is a prefix of a recently seen one, interleaved: each
    parses exactly as a full parse does (or raises the same error)."""
    s1 = b'{"type":"struct","fields":[{"type":"int64","field":"id"}]}'
    s2 = b'{"type":"struct","fields":[{"type":"int64","field":"id"},{"type":"string","field":"n"}]}'
    raws = [
        b'{"schema":' + s1 + b',"payload":{"op":"c","id":1}}',
        b'{"schema":' + s2 + b',"payload":{"op":"u","id":2,"n":"x"}}',
        b'{"schema":' + s1 + b',"payload":{"op":"d","id":3}}',
        b'{"schema":' + s1 + b',"payload":{"op":"d","id":}}',  # the payload breaks: orjson's error
        b'{"schema":' + s1 + b',"payloads":{"op":"c"}}',  # the recent schema, then no marker
        b'{"schema":' + s1[:-1] + b',"extra":1},"payload":{"op":"c","id":4}}',  # a recent schema's prefix
        b'{"schema":' + s1 + b',"payload":{"op":"c","id":5},"more":1}',  # a field after the payload
        b'{"schema":' + s2 + b',"payload":{"op":"r","id":6,"n":"payload"}}',
    ]
    for raw in raws * 3:
        assert_parses_as_orjson(raw)
