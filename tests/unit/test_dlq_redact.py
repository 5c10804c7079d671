"""Which row a dead letter holds, read from its headers or its raw key: the pure half of
changeflow/streams/dlq_redact.py (and the ``changeflow.dlq_id`` header an entry keeps its id by)."""

from __future__ import annotations

import orjson
import pytest

from changeflow.pipelines.erasure import mark
from changeflow.pipelines.load import parse
from changeflow.streams.app import dead_letter_headers
from changeflow.streams.dlq import DLQ_ID, dedupe, entry_from_message
from changeflow.streams.dlq_redact import Origin, doomed_by, origins, row_of
from changeflow.streams.erasure import Entry, Suppressor
from changeflow.streams.records import DeadLetter

PIPELINE = parse("""
name: shop
sources:
  postgres: {database: shop, topic_prefix: pg}
  mongodb: {database: people, topic_prefix: mg}
entities:
  products: {source: postgres, table: public.products}
  stock: {source: postgres, table: public.stock, key: [region, sku]}
  users: {source: mongodb, collection: users}
""", "shop.yml")
TOPICS = origins(PIPELINE)


def decode_headers(topic: str, key: bytes | None = None) -> list[tuple[str, bytes | None]]:
    """The headers the decode stage parks a message with (the real ``dead_letter_headers``)."""
    return list(dead_letter_headers(DeadLetter(key, b"{not json", topic, 0, 5, "not JSON")).items())


def test_origins_name_every_raw_and_canonical_topic() -> None:
    assert origins(PIPELINE) == {
        "pg.public.products": Origin("products", "postgres", None),
        "pg.public.stock": Origin("stock", "postgres", ("region", "sku")),
        "mg.people.users": Origin("users", "mongodb", None),
        "shop.products": Origin("products", "canonical"),
        "shop.stock": Origin("stock", "canonical"),
        "shop.users": Origin("users", "canonical"),
    }


def test_a_quarantined_record_is_read_from_its_entity_and_key_headers() -> None:
    headers = [*decode_headers("shop.products"), ("changeflow.store", b"redis"), ("changeflow.entity", b"products"),
               ("changeflow.key", b'["eu","42"]'), ("changeflow.version", b"7")]
    assert row_of(b"whatever", headers, TOPICS) == ("products", '["eu","42"]')


@pytest.mark.parametrize(("key", "row"), [
    (b'{"id": 1}', ("products", "1")),
    (b'{"id": 12345678901234567890123}', ("products", "12345678901234567890123")),
    (b'{"schema": {"type": "struct", "fields": [{"field": "id", "type": "int64"}]}, "payload": {"id": 42}}',
     ("products", "42")),
    (b'{"id": "0b6f2c1e-5d3a-4b8e-9f1a-2c3d4e5f6a7b"}', ("products", "0b6f2c1e-5d3a-4b8e-9f1a-2c3d4e5f6a7b")),
])
def test_a_decode_stage_dead_letter_is_read_from_its_topic_and_debezium_key(key: bytes, row: tuple[str, str]) -> None:
    assert row_of(key, decode_headers("pg.public.products", key), TOPICS) == row


def test_a_composite_key_is_the_json_array_of_its_columns_in_the_declared_order() -> None:
    key = b'{"sku": "A-1", "region": "eu"}'
    assert row_of(key, decode_headers("pg.public.stock", key), TOPICS) == ("stock", '["eu","A-1"]')
    # Without a declared key, the message key's own column order.
    assert row_of(b'{"a": 1, "b": "x"}', decode_headers("pg.public.products"), TOPICS) == ("products", '["1","x"]')


def test_a_key_typed_by_its_schema_reads_as_the_decode_stage_writes_it() -> None:
    # A NUMERIC key travels as base64 bytes with its scale in the schema: the row's key is the number.
    schema = {"type": "struct", "fields": [{"field": "id", "type": "bytes",
                                            "name": "org.apache.kafka.connect.data.Decimal",
                                            "parameters": {"scale": "2"}}]}
    key = orjson.dumps({"schema": schema, "payload": {"id": "MDk="}})  # 0x3039 = 12345 → 123.45
    assert row_of(key, decode_headers("pg.public.products"), TOPICS) == ("products", "123.45")


@pytest.mark.parametrize(("key", "text"), [
    (b'{"id": "\\"user-5\\""}', "user-5"),
    (b'{"schema": {"type": "struct"}, "payload": {"id": "\\"user-5\\""}}', "user-5"),
    (b'{"id": "{\\"$oid\\": \\"65a1b2c3d4e5f60718293a4b\\"}"}', "65a1b2c3d4e5f60718293a4b"),
    (b'{"id": "7"}', "number:7"),
])
def test_a_mongodb_dead_letter_is_read_from_its_id_as_the_decode_stage_spells_it(key: bytes, text: str) -> None:
    assert row_of(key, decode_headers("mg.people.users"), TOPICS) == ("users", text)


def test_a_sinks_undecodable_canonical_record_is_read_from_its_entity_prefixed_key() -> None:
    assert row_of(b"products:42", decode_headers("shop.products"), TOPICS) == ("products", "42")
    assert row_of(b"stock:42", decode_headers("shop.products"), TOPICS) is None


@pytest.mark.parametrize(("key", "headers"), [
    (None, decode_headers("pg.public.products")),  # no key
    (b"{not json", decode_headers("pg.public.products")),
    (b"[1, 2]", decode_headers("pg.public.products")),  # not an object
    (b"{}", decode_headers("pg.public.products")),
    (b'{"id": null}', decode_headers("pg.public.products")),
    (b'{"sku": "A-1"}', decode_headers("pg.public.stock")),  # a declared key column not in the message key
    (b'{"id": 5}', decode_headers("mg.people.users")),  # MongoDB's id is extended JSON text
    (b'{"id": "not json"}', decode_headers("mg.people.users")),
    (b'{"id": 1}', decode_headers("pg.public.elsewhere")),  # not one of the pipeline's topics
    (b'{"id": 1}', []),  # no headers at all
    (b'{"id": 1}', [("changeflow.source_topic", b"\xff")]),
    (b'{"id": 1}', [("changeflow.entity", b"products")]),  # an entity header without a key header, no origin
    (b'{"id": 1}', [("changeflow.entity", b"products"), ("changeflow.key", b"\xff")]),
])
def test_a_key_that_cannot_be_read_is_none(key: bytes | None, headers: list[tuple[str, bytes | None]]) -> None:
    assert row_of(key, headers, TOPICS) is None


def test_doomed_by_a_suppressor_is_any_entry_erased_or_anonymised() -> None:
    secret = b"k" * 32
    sup = Suppressor([], secret, {
        mark(secret, "users", "user-5"): Entry(mark(secret, "users", "user-5"), "erase", 1, "r1"),
        mark(secret, "orders", "9"): Entry(mark(secret, "orders", "9"), "anonymise", 1, "r1"),
    })
    doomed = doomed_by(sup)
    assert (doomed("users", "user-5"), doomed("orders", "9")) == (True, True)
    assert (doomed("users", "user-6"), doomed("orders", "user-5"), doomed("products", "9")) == (False, False, False)
    assert doomed_by(Suppressor([], secret))("users", "user-5") is False


def test_a_rewritten_dead_letter_keeps_its_id_by_its_dlq_id_header() -> None:
    origin = decode_headers("pg.public.products", b'{"id": 1}')
    first = entry_from_message(key=b"k", value=b"v", headers=origin, timestamp_ms=1, dlq_topic="shop.dlq",
                               dlq_partition=0, dlq_offset=3)
    copy = entry_from_message(key=b"k", value=b"v", headers=[*origin, (DLQ_ID, first.id.encode())], timestamp_ms=1,
                              dlq_topic="shop.dlq", dlq_partition=0, dlq_offset=90)
    assert first.id == copy.id == "pg.public.products:0:5"
    # No origin: the id is its first DLQ position, and the header keeps it there after the move.
    bare = entry_from_message(key=b"k", value=b"v", headers=[], timestamp_ms=1, dlq_topic="shop.dlq",
                              dlq_partition=0, dlq_offset=3)
    moved = entry_from_message(key=b"k", value=b"v", headers=[(DLQ_ID, b"shop.dlq:0:3")], timestamp_ms=1,
                               dlq_topic="shop.dlq", dlq_partition=0, dlq_offset=90)
    assert bare.id == moved.id == "shop.dlq:0:3"
    assert not moved.replayable
    # A crash between re-writing and deleting leaves both copies: listed once, twice parked.
    assert [(e.id, e.dlq_offset, e.copies) for e in dedupe([bare, moved])] == [("shop.dlq:0:3", 3, 2)]
