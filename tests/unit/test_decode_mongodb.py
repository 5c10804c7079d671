"""The MongoDB decoder on Debezium 3.5 records: every op, partial updates, every extended-JSON type, bad input.

tests/fixtures/mongodb/*.json are Kafka records produced by Debezium 3.5.0.Final's own MongoDB classes
(MongoDbCollectionSchema, SourceInfo, MongoDbSourceInfoStructMaker) and Kafka's JsonConverter; each file
says how it was made. The ``malformed_*`` ones are derived from those by breaking one thing.
"""

from __future__ import annotations

import base64
import copy
import json
import math
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import Message

from changeflow import schemas
from changeflow.streams.mongodb import decode_mongodb, parse_extended_json
from changeflow.streams.partial import TRUNCATE, merge_partial
from changeflow.streams.records import ChangeRecord, DeadLetter, Decoded, Skip
from tests.unit.commerce import MONGODB_ENTITIES

FIXTURES = Path(__file__).parents[1] / "fixtures" / "mongodb"
OID = "65f1c0ffee0000000000abcd"
SECRETS = ("$2b$12$abcdefghijklmnopqrstuv", "$2b$12$zyxwvutsrqponmlkjihgfe", "$2b$12$secretsecretsecretsecre")


def fixture(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / f"{name}.json").read_text())
    return data


def raw(data: dict[str, Any]) -> tuple[bytes | None, bytes | None]:
    key = None if data["key"] is None else orjson.dumps(data["key"])
    if "value_text" in data:
        return key, data["value_text"].encode()
    return key, None if data["value"] is None else orjson.dumps(data["value"])


def decode(name_or_data: str | dict[str, Any], **kwargs: Any) -> Decoded:
    data = fixture(name_or_data) if isinstance(name_or_data, str) else name_or_data
    key, value = raw(data)
    kwargs.setdefault("entities", MONGODB_ENTITIES)
    kwargs.setdefault("raw_key", key)
    return decode_mongodb(value, topic=data["topic"], partition=1, offset=77, **kwargs)


def record(name_or_data: str | dict[str, Any], **kwargs: Any) -> ChangeRecord:
    result = decode(name_or_data, **kwargs)
    assert isinstance(result, ChangeRecord), result
    return result


def version(seconds: int, increment: int) -> int:
    return (seconds << 32) | increment


def ms(epoch_ms: int) -> datetime:
    return datetime.fromtimestamp(epoch_ms / 1000, UTC)


# The users document of insert.json as a canonical row: `_id` → `id`, hashed_password gone, types decoded.
USER = {
    "id": OID,
    "email": "ada@example.com",
    "name": "Ada Lovelace",
    "status": "pending",
    "nickname": "ada",
    "age": 36,
    "login_count": 9007199254740993,
    "score": 4.75,
    "balance": Decimal("1234.50"),
    "created_at": datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC),
    "verified": True,
    "deleted_at": None,
    "tags": ["admin", "beta", "early"],
    "profile": {"city": "Paris", "zip": "75011", "geo": {"lat": 48.8566, "lon": 2.3522}},
    "addresses": [
        {"label": "home", "since": datetime(2020, 9, 13, 12, 26, 40, tzinfo=UTC)},
        {"label": "work", "since": datetime(2022, 4, 15, 5, 20, tzinfo=UTC)},
    ],
}
UPDATED = {**{k: v for k, v in USER.items() if k != "nickname"}, "status": "active",
           "profile": {"city": "Lyon", "zip": "75011", "geo": {"lat": 48.8566, "lon": 2.3522}}}


def test_insert_becomes_the_exact_canonical_record() -> None:
    result = record("insert")
    assert result == ChangeRecord(
        source="mongodb", entity="users", key=OID, op="c", version=version(1_700_000_000, 7),
        ts_ms=1_700_000_000_123, before=None, after=USER,
    )
    assert result.kafka_key == f"users:{OID}"
    assert result.origin == ("users.users.users", 1, 77)
    assert result.partial is False
    assert result.after is not None and str(result.after["balance"]) == "1234.50"


def test_snapshot_read_is_op_r_with_the_full_document() -> None:
    result = record("snapshot_read")
    assert (result.op, result.key, result.after, result.before) == ("r", OID, USER, None)
    assert result.version == version(1_699_999_995, 4)
    assert result.ts_ms == 1_699_999_995_000


def test_update_with_full_document_uses_after_and_is_not_partial() -> None:
    result = record("update_full")
    assert result == ChangeRecord(
        source="mongodb", entity="users", key=OID, op="u", version=version(1_700_000_100, 3),
        ts_ms=1_700_000_100_456, before=None, after=UPDATED,
    )
    assert result.partial is False


def test_update_with_pre_image_carries_before_and_after_without_the_secret() -> None:
    result = record("update_with_pre_image")
    assert result.before == USER
    assert result.after == UPDATED
    assert result.partial is False


def test_update_with_only_update_description_is_a_nested_partial_image() -> None:
    result = record("update_partial")
    assert result.partial is True
    assert (result.op, result.key, result.ts_ms) == ("u", OID, 1_700_000_200_789)
    assert result.version == version(1_700_000_200, 1)
    assert result.before is None
    assert result.after == {
        "id": OID,
        "nickname": None,  # removedFields
        "profile": {"zip": None, "city": "Lyon", "geo": {"lat": 45.764}},  # dotted paths, nested
        "status": "active",
        "last_login": datetime(2023, 11, 14, 22, 16, 40, 789000, tzinfo=UTC),  # relaxed ISO $date
        "login_count": 9007199254740995,  # relaxed mode: a plain 64-bit integer
        "balance": Decimal("99.95"),
        "tags": {TRUNCATE: 2, "1": "gamma"},  # truncatedArrays, then the element update
    }


def test_partial_update_merged_over_the_last_row_gives_the_new_document() -> None:
    previous = record("insert").after
    partial = record("update_partial").after
    assert previous is not None and partial is not None
    previous_copy, partial_copy = copy.deepcopy(previous), copy.deepcopy(partial)
    merged = merge_partial(previous, partial)
    assert merged == {
        **USER,
        "status": "active",
        "nickname": None,
        "profile": {"city": "Lyon", "zip": None, "geo": {"lat": 45.764, "lon": 2.3522}},
        "last_login": datetime(2023, 11, 14, 22, 16, 40, 789000, tzinfo=UTC),
        "login_count": 9007199254740995,
        "balance": Decimal("99.95"),
        "tags": ["admin", "gamma"],
    }
    assert (previous, partial) == (previous_copy, partial_copy)  # inputs untouched


def test_partial_update_without_previous_row_keeps_only_what_the_change_carried() -> None:
    partial = record("update_partial").after
    assert partial is not None
    merged = merge_partial(None, partial)
    assert merged["tags"] == [None, "gamma"]
    assert merged["profile"] == {"zip": None, "city": "Lyon", "geo": {"lat": 45.764}}
    assert TRUNCATE not in json.dumps(merged, default=str)


@pytest.mark.parametrize(
    ("previous", "partial", "expected"),
    [
        ({"a": 1, "b": 2}, {"b": 3}, {"a": 1, "b": 3}),
        ({"a": {"x": 1, "y": 2}}, {"a": {"y": None}}, {"a": {"x": 1, "y": None}}),
        ({"a": {"x": {"deep": 1, "keep": 2}}}, {"a": {"x": {"deep": 9}}}, {"a": {"x": {"deep": 9, "keep": 2}}}),
        ({"a": [1, 2]}, {"a": {"4": 5}}, {"a": [1, 2, None, None, 5]}),  # MongoDB pads with null too
        ({"a": [{"n": 1}, {"n": 2}]}, {"a": {"1": {"n": 3}}}, {"a": [{"n": 1}, {"n": 3}]}),
        ({"a": {"1": "x"}}, {"a": {"1": "y"}}, {"a": {"1": "y"}}),  # numeric key into a sub-document
        ({"a": [1, 2, 3, 4]}, {"a": {TRUNCATE: 1}}, {"a": [1]}),
        ({"a": "scalar"}, {"a": {"b": 1}}, {"a": {"b": 1}}),
        ({"a": [1, 2]}, {"a": [9]}, {"a": [9]}),  # a whole array replaces
        ({"a": {"b": 1}}, {"a": None}, {"a": None}),
        ({}, {"new": {"x": 1}}, {"new": {"x": 1}}),
    ],
)
def test_merge_partial_rules(previous: dict[str, Any], partial: dict[str, Any], expected: dict[str, Any]) -> None:
    assert merge_partial(previous, partial) == expected


def test_delete_takes_its_id_from_the_message_key() -> None:
    result = record("delete")
    assert result == ChangeRecord(
        source="mongodb", entity="users", key=OID, op="d", version=version(1_700_000_300, 2),
        ts_ms=1_700_000_300_000, before=None, after=None,
    )
    assert result.is_delete


def test_delete_without_key_or_pre_image_is_a_dead_letter() -> None:
    result = decode("delete", raw_key=None)
    assert isinstance(result, DeadLetter)
    assert result.reason == "no _id: neither the document nor the message key carries one"


def test_delete_with_pre_image_keeps_before_without_the_secret() -> None:
    result = record("delete_with_pre_image")
    assert (result.op, result.after, result.before) == ("d", None, UPDATED)


def test_tombstone_after_a_delete_is_skipped() -> None:
    assert decode("delete_tombstone") == Skip("tombstone")


def test_heartbeat_is_skipped_with_or_without_schema() -> None:
    data = fixture("heartbeat")
    assert data["value"]["schema"]["name"] == "io.debezium.connector.common.Heartbeat"
    assert decode(data) == Skip("heartbeat")
    assert decode({**data, "value": data["value"]["payload"]}) == Skip("heartbeat")


@pytest.mark.parametrize("name", ["transaction_begin", "transaction_end"])
def test_transaction_metadata_is_skipped(name: str) -> None:
    assert decode(name) == Skip("transaction metadata")


def test_schemaless_json_converter_output_decodes_the_same() -> None:
    assert record("schemaless_insert") == record("insert")


def test_unmapped_collection_is_skipped() -> None:
    assert decode("unmapped_collection") == Skip("collection users.sessions not mapped")


def test_without_entity_map_the_document_passes_through_untransformed() -> None:
    result = record("insert", entities=None)
    assert result.entity == "users"
    assert result.after is not None and result.after["hashed_password"] == SECRETS[0]


def test_every_extended_json_type_of_a_strict_mode_document() -> None:
    result = record("insert_types")
    assert result.key == "number:1004"  # $numberLong _id (the key says 1004): a number, never the string "1004"
    after = result.after
    assert after is not None
    nan, neg_inf = after.pop("nan"), after.pop("neg_inf")
    assert math.isnan(nan) and neg_inf == float("-inf")  # bare NaN / -Infinity in STRICT mode
    assert after == {
        "id": "number:1004",
        "email": "grace@example.com",
        "int32": -7,
        "int64": -9223372036854775808,
        "double": 0.1,
        "double_whole": 3.0,
        "decimal": Decimal("-1E-33"),
        "decimal_big": Decimal("12345678901234567890.123456789"),
        "date": datetime(2023, 11, 14, 22, 13, 20, 123000, tzinfo=UTC),
        "date_pre_epoch": datetime(1969, 12, 31, tzinfo=UTC),
        "oid": "5f0c0ffee0000000000ab123",
        "uuid": "8d3c5a0e-4a43-4b0e-9d59-0c8e3f1a2b3c",
        "nested": {"deeper": {"when": datetime(1970, 1, 1, tzinfo=UTC), "n": 5}},
        "mixed": [1, 2, Decimal("3.30"), None, [datetime(1970, 1, 1, 0, 0, 1, tzinfo=UTC)]],
    }
    assert isinstance(after["double_whole"], float) and isinstance(after["int64"], int)
    assert str(after["decimal_big"]) == "12345678901234567890.123456789"


def test_every_extended_json_type_of_relaxed_mode_updated_fields() -> None:
    result = record("update_partial_types")
    after = result.after
    assert result.partial and after is not None
    nan, neg_inf = after.pop("nan"), after.pop("neg_inf")
    assert math.isnan(nan) and neg_inf == float("-inf")  # {"$numberDouble": "NaN"}
    assert after == {
        "id": "number:1004",
        "int32": -8,
        "int64": -9223372036854775808,
        "date_pre_epoch": datetime(1969, 12, 31, tzinfo=UTC),  # {"$date": {"$numberLong": "-86400000"}}
        "uuid": "8d3c5a0e-4a43-4b0e-9d59-0c8e3f1a2b3c",  # {"$binary": {"base64", "subType": "04"}}
        "oid": "5f0c0ffee0000000000ab123",
    }


def test_string_id_key_is_the_string_itself() -> None:
    result = record("insert_string_id")
    assert result.key == "u-42"  # the message key holds "\"u-42\""
    assert result.after == {"id": "u-42", "email": "x@example.com"}


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ('{"$oid": "65F1C0FFEE0000000000ABCD"}', OID),
        ('{"$date": 1700000000000}', datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)),
        ('{"$date": {"$numberLong": "1700000000000"}}', datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)),
        ('{"$date": "2023-11-14T22:13:20Z"}', datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)),
        ('{"$date": "2023-11-15T00:13:20.5+02:00"}', datetime(2023, 11, 14, 22, 13, 20, 500000, tzinfo=UTC)),
        ('{"$numberDecimal": "0.10"}', Decimal("0.10")),
        ('{"$numberLong": "9223372036854775807"}', 9223372036854775807),
        ('{"$numberInt": "-3"}', -3),
        ('{"$numberDouble": "1.5"}', 1.5),
        ('{"$numberDouble": "Infinity"}', float("inf")),
        ('{"$binary": "a2Fma2E=", "$type": "00"}', "a2Fma2E="),
        ('{"$timestamp": {"t": 1700000000, "i": 7}}', version(1_700_000_000, 7)),
        ('{"a": [{"$numberInt": "1"}, {"b": {"$oid": "65f1c0ffee0000000000abcd"}}]}', {"a": [1, {"b": OID}]}),
        ("{}", {}),
    ],
)
def test_extended_json_forms(text: str, value: Any) -> None:
    decoded = parse_extended_json(text, "value")
    assert decoded == value
    assert type(decoded) is type(value)


def test_versions_follow_cluster_time_order() -> None:
    base = fixture("update_full")
    versions = []
    for ts_ms, ord_ in [(1_700_000_100_000, 3), (1_700_000_100_999, 4), (1_700_000_101_000, 1)]:
        data = copy.deepcopy(base)
        data["value"]["payload"]["source"].update(ts_ms=ts_ms, ord=ord_)
        versions.append(record(data).version)
    assert versions == sorted(versions) and len(set(versions)) == 3
    assert versions[0] == 1_700_000_100 * 2**32 + 3


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("malformed_not_json", "not JSON: unexpected character, expected a JSON value: line 1 column 1 (char 0)"),
        ("malformed_after_not_extended_json",
         "after is not valid extended JSON: Unterminated string starting at: line 1 column 55 (char 54)"),
        ("malformed_after_not_string", "after is not an extended-JSON string"),
        ("malformed_bad_oid", "bad $oid 'not-an-object-id'"),
        ("malformed_missing_id", "no _id: neither the document nor the message key carries one"),
        ("malformed_unknown_op", "unknown op 't'"),
        ("malformed_missing_source", "source block missing"),
        ("malformed_missing_ord", "source.ord missing: cannot order this change"),
        ("malformed_bad_decimal", "bad $numberDecimal 'twelve'"),
        ("malformed_unsupported_type", "unsupported extended JSON type ['$options', '$regex']"),
        ("malformed_date_out_of_range", "$date 253402300800000 ms is outside the years 1-9999"),
        ("malformed_key_mismatch", "message key id does not match the document _id"),
        ("malformed_update_without_image", "update carries neither after nor updateDescription"),
    ],
)
def test_malformed_input_becomes_a_dead_letter_with_its_bytes(name: str, reason: str) -> None:
    data = fixture(name)
    key, value = raw(data)
    result = decode(data)
    assert result == DeadLetter(key, value, "users.users.users", 1, 77, reason)


@pytest.mark.parametrize("name", sorted(p.stem for p in FIXTURES.glob("*.json")))
def test_hashed_password_never_leaves_the_decoder(name: str) -> None:
    result = decode(name)
    if isinstance(result, ChangeRecord):
        text = repr((result.before, result.after))
        assert "hashed_password" not in text
        assert not any(secret in text for secret in SECRETS)


def test_partial_update_crosses_the_canonical_topic_and_fills_from_the_store() -> None:
    """What a sink sees: Avro on `changeflow.users`, then the partial merged over the row the store holds."""
    from changeflow.sinks.base import fill_partials
    from changeflow.sinks.runner import record_from_message
    from changeflow.streams.app import to_avro

    def message(value: bytes) -> Message:
        return Message(topic="changeflow.users", partition=0, offset=5, value=value)

    book = schemas.SchemaBook()
    partial = record_from_message(message(to_avro(book, record("update_partial"))), book)
    assert partial.partial is True
    stored = record_from_message(message(to_avro(book, record("insert"))), book).after
    assert stored is not None

    def fetch(entity: str, keys: list[str]) -> dict[str, dict[str, Any]]:
        assert (entity, keys) == ("users", [OID])
        return {OID: stored}

    [filled] = fill_partials([partial], fetch)
    assert filled.partial is False
    assert filled.after is not None
    declared = {k: filled.after[k] for k in ("id", "email", "name", "status", "profile")}
    assert declared == {
        "id": OID, "email": "ada@example.com", "name": "Ada Lovelace", "status": "active",
        "profile": {"city": "Lyon", "zip": None, "geo": {"lat": 45.764, "lon": 2.3522}},
    }
    # Fields the pipeline does not declare travel typed from their values (Decimal128 stays exact)...
    assert filled.after["age"] == 36 and filled.after["balance"] == Decimal("99.95")
    # ...but a dropped secret never does.
    assert "hashed_password" not in filled.after


def test_a_document_field_called_id_never_replaces_the_key() -> None:
    data = fixture("insert_string_id")
    data["value"]["payload"]["after"] = '{"id": "legacy-7", "_id": "u-42", "email": "x@example.com"}'
    assert record(data).after == {"id": "u-42", "email": "x@example.com"}


def test_a_uuid_in_extended_json_v2_form_decodes_like_the_binary_subtype_4_form() -> None:
    """Issue 20 §11: `{"$uuid": ...}` was a dead letter ("unsupported extended JSON type")."""
    from changeflow.streams.mongodb import key_string

    text = "0b6f2c9e-3d1a-4c55-9a7e-2f1d0c3b4a59"
    binary = {"$binary": {"base64": base64.b64encode(uuid.UUID(text).bytes).decode(), "subType": "04"}}
    assert parse_extended_json(orjson.dumps({"u": {"$uuid": text}}).decode(), "after") == {"u": text}
    assert parse_extended_json(orjson.dumps({"u": binary}).decode(), "after") == {"u": text}
    assert key_string({"$uuid": text}) == key_string(binary) == f"uuid:{text}"
    for bad in ("0b6f2c9e3d1a4c559a7e2f1d0c3b4a59", "not-a-uuid-at-all-0000-000000000000", 42):
        with pytest.raises(ValueError, match=r"bad \$uuid"):
            parse_extended_json(orjson.dumps({"u": {"$uuid": bad}}).decode(), "after")
