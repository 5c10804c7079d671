"""Issue 11, sections 1 and 2, in the pure decoders: every hostile input named there, with the exact value
it must become or the dead-letter reason it must carry. A decoder never raises: any input is a record, a
skip or a dead letter with a bounded reason."""

from __future__ import annotations

import copy
import math
from datetime import UTC, datetime, time
from decimal import Decimal
from typing import Any

import orjson
import pytest

from changeflow.pipelines.transform import Transformer
from changeflow.pipelines.types import ColumnType
from changeflow.schemas import json as cjson
from changeflow.sinks.clickhouse import to_column
from changeflow.streams.debezium import UNAVAILABLE, decode_postgres
from changeflow.streams.mongodb import decode_mongodb
from changeflow.streams.records import ChangeRecord, DeadLetter, Decoded, Skip
from tests.unit.commerce import MONGODB_ENTITIES, POSTGRES_ENTITIES
from tests.unit.envelopes import PRODUCT_FIELDS, decimal_bytes, encoded, envelope, product_row

POS: dict[str, Any] = {"topic": "commerce.public.products", "partition": 2, "offset": 41}
KEY_1 = b'{"id":1}'
BIG = 10**30
BIG_TEXT = "1000000000000000000000000000000"


def pg(message: dict[str, Any] | bytes | None, key: bytes | None = KEY_1, **kwargs: Any) -> Decoded:
    raw = message if isinstance(message, bytes) or message is None else encoded(message)
    kwargs.setdefault("entities", POSTGRES_ENTITIES)
    return decode_postgres(raw, raw_key=key, **POS, **kwargs)


def dead_reason(result: Decoded) -> str:
    assert isinstance(result, DeadLetter), result
    assert len(result.reason) <= 300
    return result.reason


def record(result: Decoded) -> ChangeRecord:
    assert isinstance(result, ChangeRecord), result
    return result


def typed(column: dict[str, Any], value: Any, **row: Any) -> Decoded:
    """A create of a table ``things`` (no entity map: kept as it came) with one extra typed column."""
    fields = [{"type": "int64", "optional": False, "field": "id"}, {**column, "field": "v"}]
    return pg(envelope("c", None, {"id": 1, "v": value, **row}, table="things", fields=fields), entities=None)


def typed_value(column: dict[str, Any], value: Any) -> Any:
    result = record(typed(column, value))
    assert result.after is not None
    return result.after["v"]


# --- 1. a poison message never stops the pipeline -----------------------------------------------------

@pytest.mark.parametrize(("after", "kind"), [([1, 2], "list"), ("a row", "str"), (42, "int")])
def test_after_that_is_not_an_object_is_a_dead_letter(after: Any, kind: str) -> None:
    message = envelope("c", None, product_row(1))
    message["payload"]["after"] = after
    assert dead_reason(pg(message)) == f"DecodeError: row image is {kind}, not an object"


def test_schema_that_is_a_string_is_a_dead_letter() -> None:
    message = envelope("c", None, product_row(1))
    message["schema"] = "commerce.public.products.Envelope"
    assert dead_reason(pg(message)) == "schema is not an object"


def test_schema_named_null_decodes_from_its_fields() -> None:
    message = envelope("c", None, product_row(1))
    message["schema"]["name"] = None
    result = record(pg(message))
    assert result.after is not None and result.after["price"] == Decimal("19.99")


def test_non_object_entries_in_schema_fields_are_ignored() -> None:
    message = envelope("c", None, product_row(1))
    message["schema"]["fields"].insert(0, "junk")
    message["schema"]["fields"][2]["fields"] = ["junk", 7, None, *PRODUCT_FIELDS]  # the after row's fields
    result = record(pg(message))
    assert result.after is not None
    assert result.after["updated_at"] == datetime(2026, 11, 24, 10, 15, 30, 123456, tzinfo=UTC)


def test_decimal_field_with_null_parameters_is_a_dead_letter() -> None:
    column = {"type": "bytes", "name": "org.apache.kafka.connect.data.Decimal", "parameters": None}
    assert dead_reason(typed(column, decimal_bytes(1999))) == "DecodeError: Decimal field without a scale parameter"


def test_mongodb_after_nested_600_levels_is_a_dead_letter() -> None:
    deep = "1"
    for _ in range(600):
        deep = '{"a": ' + deep + "}"
    message = {"op": "c", "after": '{"_id": 1, "x": ' + deep + "}",
               "source": {"ts_ms": 1_700_000_000_000, "ord": 1, "db": "users", "collection": "users"}}
    result = decode_mongodb(orjson.dumps(message), topic="users", partition=0, offset=0, raw_key=None)
    assert dead_reason(result).startswith("RecursionError: maximum recursion depth exceeded")


def test_an_unexpected_exception_anywhere_in_decode_is_a_dead_letter() -> None:
    class Exploding:
        def __init__(self, real: Transformer) -> None:
            self.spec = real.spec

        def image(self, row: Any, **_: Any) -> Any:
            if row is None:
                return None
            raise RuntimeError("boom " + "x" * 10_000)

        def apply(self, *_: Any, **__: Any) -> Any:
            raise IndexError("list index out of range")

    entities: Any = {k: Exploding(v) for k, v in POSTGRES_ENTITIES.items()}
    assert dead_reason(pg(envelope("c", None, product_row(1)), entities=entities)) == (
        "IndexError: list index out of range")
    reason = dead_reason(pg(envelope("u", product_row(1), product_row(1)), entities=entities))
    assert reason.startswith("RuntimeError: boom xxx") and len(reason) == 300


@pytest.mark.parametrize("raw", [b"\xff\xfe not utf-8", b"[1, 2]", b'"just a string"', b"{" * 5000, b"null"])
def test_bytes_that_are_no_envelope_are_dead_letters(raw: bytes) -> None:
    result = pg(raw)
    assert isinstance(result, DeadLetter) and result.raw_value == raw and len(result.reason) <= 300


def test_reason_never_repeats_a_200_kb_value() -> None:
    message = envelope("c", None, product_row(1))
    message["payload"]["op"] = "x" * 200_000
    reason = dead_reason(pg(message))
    assert reason.startswith("unknown op 'xxx") and len(reason) == 300


def test_reason_never_holds_the_repr_of_a_500_kb_row() -> None:
    column = {"type": "int64", "name": "io.debezium.time.MicroTimestamp"}
    reason = dead_reason(typed(column, "y" * 500_000))
    assert reason.startswith("ValueError: invalid literal for int() with base 10: 'yyy")
    message = {"op": "c", "after": orjson.dumps({"_id": {"$weird": "z" * 500_000}}).decode(),
               "source": {"ts_ms": 1_700_000_000_000, "ord": 1, "db": "users", "collection": "users"}}
    reason = dead_reason(decode_mongodb(orjson.dumps(message), topic="users", partition=0, offset=0, raw_key=None))
    assert reason.startswith("unsupported extended JSON type ['$weird']")


def test_every_dead_letter_reason_is_bounded() -> None:
    letter = DeadLetter(None, b"x", "t", 0, 0, "r" * 1_000_000)
    assert len(letter.reason) == 300 and letter.reason.endswith("…")


# --- 2. exact values, or a dead letter -------------------------------------------------------------

def test_toast_placeholder_in_bytea_and_in_arrays_is_never_data() -> None:
    fields: list[dict[str, Any]] = [{"type": "int64", "optional": False, "field": "id"},
              {"type": "bytes", "optional": True, "field": "blob"},
              {"type": "array", "items": {"type": "string"}, "optional": True, "field": "tags"},
              {"type": "string", "optional": True, "field": "note"}]
    blob = cjson.dumps(UNAVAILABLE.encode()).decode().strip('"')  # the placeholder's bytes, base64
    row = {"id": 1, "blob": blob, "tags": [UNAVAILABLE], "note": "kept"}
    result = record(pg(envelope("u", None, row, table="things", fields=fields), entities=None))
    assert result.partial and result.after == {"id": 1, "note": "kept"}


def test_integer_beyond_64_bits_is_exact_in_the_key_and_the_row() -> None:
    fields: list[dict[str, Any]] = [{"type": "int64", "optional": False, "field": "id"},
                                    {"type": "string", "field": "name"}]
    raw = with_big_id(envelope("c", None, {"id": 7, "name": "big"}, table="things", fields=fields))
    result = record(pg(raw, key=b'{"id":%s}' % BIG_TEXT.encode(), entities=None))
    assert result.key == BIG_TEXT and result.kafka_key == f"things:{BIG_TEXT}"
    assert result.after == {"id": BIG, "name": "big"} and type(result.after["id"]) is int


def with_big_id(message: dict[str, Any]) -> bytes:
    """The message as Debezium's JsonConverter writes an id of 10**30 (orjson cannot write one)."""
    raw = encoded(message)
    assert raw.count(b'"id":7') == 1
    return raw.replace(b'"id":7', b'"id":' + BIG_TEXT.encode())


def test_message_key_beyond_64_bits_that_disagrees_is_a_dead_letter() -> None:
    fields = [{"type": "int64", "optional": False, "field": "id"}]
    raw = with_big_id(envelope("c", None, {"id": 7}, table="things", fields=fields))
    key = b'{"id":%d}' % (BIG + 1)  # 10**30 + 1: as floats the two are equal
    assert dead_reason(pg(raw, key=key, entities=None)) == (
        "DecodeError: the message key disagrees with the row's key columns")


def test_numeric_key_under_decimal_format_numeric_is_exact() -> None:
    fields = [{"type": "bytes", "name": "org.apache.kafka.connect.data.Decimal", "optional": False,
               "parameters": {"scale": "0"}, "field": "id"}]
    raw = encoded(envelope("c", None, {"id": 0}, table="things", fields=fields)).replace(
        b'"after":{"id":0}', b'"after":{"id":' + BIG_TEXT.encode() + b"}")
    result = record(pg(raw, key=b'{"id":' + BIG_TEXT.encode() + b"}", entities=None))
    assert result.key == BIG_TEXT and result.after == {"id": Decimal(BIG_TEXT)}


JSON_COLUMN = {"type": "string", "optional": True, "name": "io.debezium.data.Json", "version": 1}


def test_json_numbers_keep_every_digit_and_stay_numbers_in_the_stores() -> None:
    doc = typed_value(JSON_COLUMN, '{"n": 123456789012345678901234567890, "f": 0.10000000000000000001, "s": 1.5}')
    assert doc == {"n": 123456789012345678901234567890, "f": Decimal("0.10000000000000000001"), "s": 1.5}
    assert type(doc["n"]) is int and type(doc["s"]) is float and isinstance(doc["f"], cjson.JsonNumber)
    text = b'{"n":123456789012345678901234567890,"f":0.10000000000000000001,"s":1.5}'
    assert cjson.dumps(doc) == text  # Redis and search documents: numbers, not strings
    assert to_column(doc, ColumnType("json")) == text.decode()  # ClickHouse's JSON text
    assert cjson.loads(text) == doc and cjson.loads(text.decode()) == doc
    # a decimal column is still an exact string
    assert cjson.dumps({"price": Decimal("0.10000000000000000001")}) == b'{"price":"0.10000000000000000001"}'


@pytest.mark.parametrize(("text", "value", "written"), [
    ("-9223372036854775809", -9223372036854775809, "-9223372036854775809"),  # below int64: orjson gives a float
    ("18446744073709551616", 18446744073709551616, "18446744073709551616"),  # beyond uint64
    ("1e400", Decimal("1e400"), "1E+400"),  # beyond float
    ("0.30000000000000004", 0.30000000000000004, "0.30000000000000004"),  # 17 digits a float holds exactly
])
def test_json_numbers_at_the_edges_of_64_bits_and_float(text: str, value: Any, written: str) -> None:
    got = cjson.loads(f"[{text}]")
    assert got == [value]
    assert type(got[0]) is (cjson.JsonNumber if isinstance(value, Decimal) else type(value))
    assert cjson.dumps(got) == f"[{written}]".encode()


def test_json_without_long_numbers_takes_the_fast_parse() -> None:
    assert typed_value(JSON_COLUMN, '[{"sku": "A", "qty": 2, "w": 0.25}]') == [{"sku": "A", "qty": 2, "w": 0.25}]


def test_numeric_under_decimal_format_numeric_is_not_built_from_a_float() -> None:
    column = {"type": "bytes", "name": "org.apache.kafka.connect.data.Decimal", "parameters": {"scale": "2"}}
    raw = encoded(envelope("c", None, {"id": 1, "v": 0}, table="things", fields=[
        {"type": "int64", "optional": False, "field": "id"}, {**column, "field": "v"}]))
    raw = raw.replace(b'"v":0', b'"v":12345678901234567890.12')
    after = record(pg(raw, entities=None)).after
    assert after is not None and after["v"] == Decimal("12345678901234567890.12")
    assert str(after["v"]) == "12345678901234567890.12"


@pytest.mark.parametrize(("column", "value", "expected"), [
    ({"type": "string"}, "-1234.56", "-1234.56"),  # decimal.handling.mode=string: the exact text
    ({"type": "double"}, -1234.56, -1234.56),  # mode=double: the double Debezium sends
    ({"type": "struct", "name": "io.debezium.data.VariableScaleDecimal"},
     {"scale": 25, "value": decimal_bytes(-12345678901234567890123456789)},
     Decimal("-1234.5678901234567890123456789")),
    ({"type": "bytes", "name": "org.apache.kafka.connect.data.Decimal", "parameters": {"scale": "2"}},
     decimal_bytes(-123456), Decimal("-1234.56")),
])
def test_numeric_in_every_decimal_handling_mode(column: dict[str, Any], value: Any, expected: Any) -> None:
    got = typed_value(column, value)
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize("column", [
    {"type": "bytes", "name": "org.apache.kafka.connect.data.Decimal", "parameters": {"scale": "2"}},
    {"type": "struct", "name": "io.debezium.data.VariableScaleDecimal"},
])
def test_decimal_whose_base64_is_invalid_is_a_dead_letter(column: dict[str, Any]) -> None:
    value = "!!!!" if column["type"] == "bytes" else {"scale": 2, "value": "!!!!"}
    assert dead_reason(typed(column, value)) == "DecodeError: Decimal bytes are not base64: '!!!!'"


def test_a_decimal_scale_no_numeric_can_have_is_a_dead_letter() -> None:
    """A VariableScaleDecimal of scale -999999999999 decodes to 1E+999999999999, whose plain text no store
    can write (the sinks ran out of memory on it): a dead letter at decode."""
    column = {"type": "struct", "name": "io.debezium.data.VariableScaleDecimal", "field": "v"}
    reason = dead_reason(typed(column, {"scale": -999_999_999_999, "value": "AQ=="}))
    assert reason == "DecodeError: Decimal scale -999999999999 is outside what PostgreSQL's numeric can hold"


@pytest.mark.parametrize(("column", "value", "expected"), [
    ({"type": "int64", "name": "io.debezium.time.MicroTime"}, 37_230_123_456, time(10, 20, 30, 123456)),
    ({"type": "int32", "name": "io.debezium.time.Time"}, 37_230_123, time(10, 20, 30, 123000)),
    ({"type": "int32", "name": "org.apache.kafka.connect.data.Time"}, 37_230_123, time(10, 20, 30, 123000)),
    ({"type": "int64", "name": "io.debezium.time.NanoTime"}, 37_230_123_456_789, time(10, 20, 30, 123456)),
    ({"type": "int64", "name": "io.debezium.time.MicroTime"}, 0, time(0, 0)),
    ({"type": "string", "name": "io.debezium.time.ZonedTime"}, "10:20:30.123456Z",
     time(10, 20, 30, 123456, tzinfo=UTC)),
    ({"type": "string", "name": "io.debezium.time.ZonedTime"}, "12:20:30+02:00", time(10, 20, 30, tzinfo=UTC)),
])
def test_time_types_become_time_values(column: dict[str, Any], value: Any, expected: time) -> None:
    got = typed_value(column, value)
    assert got == expected and got.tzinfo == expected.tzinfo


@pytest.mark.parametrize(("column", "value", "reason"), [
    ({"type": "int64", "name": "io.debezium.time.MicroTime"}, 86_400_000_000,
     "DecodeError: time of day 86400000000 µs is outside 00:00-23:59:59.999999"),  # 24:00:00
    ({"type": "string", "name": "io.debezium.time.ZonedTime"}, "10:20:30",
     "DecodeError: ZonedTime without an offset: '10:20:30'"),
])
def test_times_that_are_no_time_of_day_are_dead_letters(column: dict[str, Any], value: Any, reason: str) -> None:
    assert dead_reason(typed(column, value)) == reason


@pytest.mark.parametrize("kind", ["float", "double"])
@pytest.mark.parametrize(("text", "check"), [
    ("NaN", math.isnan), ("Infinity", lambda v: v == math.inf), ("-Infinity", lambda v: v == -math.inf),
])
def test_float_nan_and_infinity_strings_become_floats(kind: str, text: str, check: Any) -> None:
    got = typed_value({"type": kind}, text)
    assert type(got) is float and check(got)


def test_float_field_with_some_other_string_is_a_dead_letter() -> None:
    assert dead_reason(typed({"type": "double"}, "lots")) == "DecodeError: double value 'lots' is not a number"


def test_float_nan_in_the_json_stores_is_null() -> None:
    assert cjson.dumps({"v": math.nan, "w": math.inf, "x": -math.inf}) == b'{"v":null,"w":null,"x":null}'


def test_zoned_timestamp_without_an_offset_is_a_dead_letter() -> None:
    message = envelope("c", None, product_row(1, updated_at="2026-11-24T10:15:30.123456"))
    assert dead_reason(pg(message)) == "DecodeError: ZonedTimestamp without an offset: '2026-11-24T10:15:30.123456'"


@pytest.mark.parametrize("op", ["c", "u", "r"])
def test_create_or_update_without_an_after_image_is_a_dead_letter(op: str) -> None:
    assert dead_reason(pg(envelope(op, product_row(1), None))) == f"DecodeError: op {op} without an after image"


def test_key_comes_from_every_key_column_of_the_message_key() -> None:
    fields: list[dict[str, Any]] = [{"type": "string", "optional": False, "field": "region"},
              {"type": "int64", "optional": False, "field": "n"}, {"type": "string", "field": "x"}]
    message = envelope("c", None, {"region": "eu", "n": 42, "x": "y"}, table="things", fields=fields)
    assert record(pg(message, key=b'{"region":"eu","n":42}', entities=None)).key == '["eu","42"]'
    assert dead_reason(pg(message, key=b'{"region":"us","n":42}', entities=None)) == (
        "DecodeError: the message key disagrees with the row's key columns")


def test_truncate_is_a_dead_letter() -> None:
    message = envelope("t", None, None)
    assert dead_reason(pg(message)) == "truncate is not supported"


def test_logical_decoding_message_is_skipped() -> None:
    message = envelope("m", None, None)
    message["payload"]["message"] = {"prefix": "audit", "content": "aGVsbG8="}
    assert pg(message) == Skip("logical decoding message")


@pytest.mark.parametrize("payload", [{"ts_ms": 1_795_000_000_000}, {}, {"after": {"id": 1}}])
def test_payload_with_neither_op_nor_source_is_a_dead_letter(payload: dict[str, Any]) -> None:
    reason = "neither op nor source: not a change event (a heartbeat has a schema named *.Heartbeat)"
    assert dead_reason(pg({"schema": {"type": "struct", "name": "x.Value"}, "payload": payload})) == reason
    assert dead_reason(pg(payload)) == reason
    mongo = decode_mongodb(orjson.dumps(payload), topic="users", partition=0, offset=0, raw_key=None)
    assert dead_reason(mongo) == reason


def test_real_heartbeats_are_skipped() -> None:
    heartbeat: dict[str, Any] = {"schema": {"type": "struct", "name": "io.debezium.connector.common.Heartbeat",
                            "fields": [{"type": "int64", "field": "ts_ms"}]}, "payload": {"ts_ms": 1}}
    assert pg(heartbeat, key=b'{"serverName":"commerce"}') == Skip("heartbeat")
    assert pg(heartbeat["payload"], key=b'{"serverName":"commerce"}') == Skip("heartbeat")  # schemas off


# --- MongoDB _ids of different BSON types never collide -----------------------------------------------

OID = "65f1c0ffee0000000000abcd"


def mongo(id_text: str, key_text: str | None = None) -> Decoded:
    message = {"op": "c", "after": f'{{"_id": {id_text}, "email": "x@example.com"}}',
               "source": {"ts_ms": 1_700_000_000_000, "ord": 1, "db": "users", "collection": "users"}}
    key = None if key_text is None else orjson.dumps({"id": key_text})
    return decode_mongodb(orjson.dumps(message), topic="users", partition=0, offset=0, raw_key=key,
                          entities=MONGODB_ENTITIES)


@pytest.mark.parametrize(("doc_id", "key_id", "key"), [
    (f'{{"$oid": "{OID}"}}', f'{{"$oid": "{OID}"}}', OID),
    (f'"{OID}"', f'"{OID}"', f"string:{OID}"),
    ("12", "12", "number:12"),
    ('{"$numberLong": "12"}', "12", "number:12"),  # int64 in the document, relaxed in the key
    ("12.0", '{"$numberDouble": "12.0"}', "number:12"),  # MongoDB's _id index holds 12 and 12.0 as one
    ('{"$numberDecimal": "12.50"}', '{"$numberDecimal": "12.5"}', "number:12.5"),
    ("0.1", "0.1", "number:0.1000000000000000055511151231257827021181583404541015625"),
    ('"12"', '"12"', "12"),
    ('"u-42"', '"u-42"', "u-42"),
    ('"number:12"', '"number:12"', "string:number:12"),
    ("true", "true", "bool:true"),
    ('{"$date": 1700000000000}', '{"$date": "2023-11-14T22:13:20Z"}', "date:2023-11-14T22:13:20+00:00"),
    ('{"$binary": "jTxaDkpDSw6dWQyOPxorPA==", "$type": "04"}',
     '{"$binary": {"base64": "jTxaDkpDSw6dWQyOPxorPA==", "subType": "04"}}',
     "uuid:8d3c5a0e-4a43-4b0e-9d59-0c8e3f1a2b3c"),
    ('"8d3c5a0e-4a43-4b0e-9d59-0c8e3f1a2b3c"', '"8d3c5a0e-4a43-4b0e-9d59-0c8e3f1a2b3c"',
     "8d3c5a0e-4a43-4b0e-9d59-0c8e3f1a2b3c"),
    ('{"$binary": "AAE=", "$type": "00"}', '{"$binary": {"base64": "AAE=", "subType": "00"}}', "binary:00:AAE="),
    ('{"a": 1}', '{"a": 1}', 'json:{"a":1}'),
])
def test_mongodb_id_key_text_names_its_type(doc_id: str, key_id: str, key: str) -> None:
    result = record(mongo(doc_id, key_id))
    assert result.key == key and result.after is not None and result.after["id"] == key


def test_mongodb_ids_of_different_types_are_different_keys() -> None:
    ids = [f'{{"$oid": "{OID}"}}', f'"{OID}"', "12", '"12"', '"number:12"', "true", '"true"',
           '{"$binary": "jTxaDkpDSw6dWQyOPxorPA==", "$type": "04"}', '"8d3c5a0e-4a43-4b0e-9d59-0c8e3f1a2b3c"']
    keys = [record(mongo(i)).key for i in ids]
    assert len(set(keys)) == len(ids), keys


def test_mongodb_key_of_another_type_than_the_document_id_is_a_dead_letter() -> None:
    assert dead_reason(mongo("12", '"12"')) == "message key id does not match the document _id"


def test_mongodb_null_id_is_a_dead_letter() -> None:
    assert dead_reason(mongo("null")) == "_id is null"


def test_decoders_do_not_modify_the_cached_schema() -> None:
    message = envelope("c", None, product_row(1))
    before = copy.deepcopy(message["schema"])
    record(pg(message))
    raw = encoded(message).replace(b'"id":1,', b'"id":' + BIG_TEXT.encode() + b",", 1)  # the exact re-parse
    assert isinstance(pg(raw, key=b'{"id":' + BIG_TEXT.encode() + b"}"), ChangeRecord | DeadLetter)
    assert message["schema"] == before
