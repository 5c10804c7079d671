"""Dead letters of erased rows removed from a real DLQ topic (changeflow/streams/dlq_redact.py): the others stay,
byte for byte, in order, under their ids, with their replays still recorded; a dead letter parked afterwards is
never touched. A pipeline of its own (unique topics), nothing of the running worker's."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from confluent_kafka import Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from changeflow.deploy.secrets import erasure_key
from changeflow.pipelines.erasure import mark
from changeflow.pipelines.load import parse
from changeflow.pipelines.spec import Pipeline
from changeflow.settings import Settings
from changeflow.streams.dlq import (
    DLQ_ID,
    ReplayRecord,
    ensure_replay_topic,
    read_dead_letters,
    read_replays,
    read_topic,
    replayed_topic_name,
)
from changeflow.streams.dlq_redact import redact, redact_suppressed
from changeflow.streams.erasure import Entry
from changeflow.worker import DLQ_CONFIG, SUPPRESSION_CONFIG

pytestmark = pytest.mark.integration

Headers = list[tuple[str, bytes]]


@pytest.fixture
def scratch() -> Iterator[tuple[Settings, Pipeline]]:
    settings = Settings()
    name = f"redact_{uuid.uuid4().hex[:8]}"
    pipeline = parse(f"""
name: {name}
sources:
  postgres: {{database: shop, topic_prefix: {name}pg}}
  mongodb: {{database: people, topic_prefix: {name}mg}}
entities:
  products: {{source: postgres, table: public.products}}
  stock: {{source: postgres, table: public.stock, key: [region, sku]}}
  orders: {{source: postgres, table: public.orders}}
  users: {{source: mongodb, collection: users}}
erasure:
  subjects:
    user:
      entity: users
      refers:
        orders: {{column: user_id, action: anonymise}}
""", f"{name}.yml")
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    futures = admin.create_topics([NewTopic(pipeline.dlq_topic, 1, 1, config=DLQ_CONFIG)])
    futures[pipeline.dlq_topic].result(30)
    try:
        yield settings, pipeline
    finally:
        topics = [t for t in admin.list_topics(timeout=10).topics if t.startswith(f"{name}.")]
        for future in (admin.delete_topics(topics).values() if topics else []):
            future.result(30)


def origin(topic: str, offset: int, error: str = "not JSON") -> Headers:
    return [("changeflow.source_topic", topic.encode()), ("changeflow.partition", b"0"),
            ("changeflow.offset", str(offset).encode()), ("changeflow.error", error.encode())]


def quarantined(topic: str, offset: int, store: str, entity: str, key: str) -> Headers:
    return [*origin(topic, offset, "mapping conflict"), ("changeflow.store", store.encode()),
            ("changeflow.entity", entity.encode()), ("changeflow.key", key.encode()), ("changeflow.version", b"3")]


def park(settings: Settings, topic: str, letters: list[tuple[bytes | None, bytes, Headers]],
         at_ms: int = 1_795_000_000_000) -> list[int]:
    """Produce dead letters as parked at ``at_ms``, ``at_ms + 1``, ...; their offsets."""
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "acks": "all"})
    offsets: list[Any] = []
    for i, (key, value, headers) in enumerate(letters):
        producer.produce(topic, partition=0, key=key, value=value, headers=headers, timestamp=at_ms + i,
                         on_delivery=lambda err, msg: offsets.append(err or msg.offset()))
    assert producer.flush(30) == 0
    assert all(isinstance(o, int) for o in offsets), offsets
    return sorted(offsets)


def watermarks(settings: Settings, topic: str) -> tuple[int, int]:
    from confluent_kafka import Consumer

    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": f"t-{uuid.uuid4().hex}"})
    try:
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=10, cached=False)
        return low, high
    finally:
        consumer.close()


def content(msgs: list[Any]) -> list[tuple[bytes | None, bytes | None, Headers, int]]:
    return [(m.key(), m.value(), [(n, v) for n, v in (m.headers() or []) if n != DLQ_ID], m.timestamp()[1])
            for m in msgs]


def test_redaction_removes_the_erased_rows_dead_letters_and_keeps_every_other_one_with_its_id(
    scratch: tuple[Settings, Pipeline],
) -> None:
    settings, pipeline = scratch
    ns = pipeline.namespace
    products, stock, users = f"{ns}pg.public.products", f"{ns}pg.public.stock", f"{ns}mg.people.users"
    letters: list[tuple[bytes | None, bytes, Headers]] = [
        (b'{"id": 1}', b"{not json 1", origin(products, 10)),  # products 1: doomed
        (b'{"id": 2}', b"{not json 2", origin(products, 11)),
        (b'{"schema": {"type": "struct"}, "payload": {"id": 1}}', b"[1]", origin(products, 12)),  # doomed
        (b'{"region": "eu", "sku": "A-1"}', b"{bad stock", origin(stock, 3)),
        (b'{"id": "\\"user-5\\""}', b"{bad user 5", origin(users, 7)),  # users user-5: doomed
        (b'{"id": "\\"user-6\\""}', b"{bad user 6", origin(users, 8)),
        (b"products:1", b"avro?", quarantined(f"{ns}.products", 40, "redis", "products", "1")),  # doomed
        (b"users:user-6", b"avro!", quarantined(f"{ns}.users", 41, "search", "users", "user-6")),
        (b"no json key", b"{x", origin(products, 13)),  # unreadable: kept
        (None, b"lost origin", []),  # no headers at all: unreadable, kept, id by its DLQ position
        (b"users:user-5", b"avro.", quarantined(f"{ns}.users", 42, "clickhouse", "users", "user-5")),  # doomed
    ]
    doomed_at = {0, 2, 4, 6, 10}
    offsets = park(settings, pipeline.dlq_topic, letters)
    low0, high = watermarks(settings, pipeline.dlq_topic)
    assert (low0, high) == (offsets[0], offsets[-1] + 1)
    before = read_dead_letters(settings, pipeline)
    kept_ids = [e.id for e in before if e.dlq_offset - offsets[0] not in doomed_at]
    assert f"{pipeline.dlq_topic}:0:{offsets[9]}" in kept_ids  # the bare one, named by its position
    # One kept dead letter was replayed already: that stays recorded against its id.
    ensure_replay_topic(settings, pipeline)
    replayed_id = f"{products}:0:11"
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "acks": "all"})
    producer.produce(replayed_topic_name(pipeline.dlq_topic), key=replayed_id.encode(),
                     value=ReplayRecord(replayed_id, 1, products, 0, 99).encode())
    assert producer.flush(30) == 0

    said: list[str] = []
    result = redact(settings, pipeline, lambda e, k: (e, k) in {("products", "1"), ("users", "user-5")}, said.append)

    assert (result.kept, result.removed, result.unreadable, result.late) == (6, 5, 2, 0)
    assert result.highs == {0: high}
    assert result.low_watermark == high == watermarks(settings, pipeline.dlq_topic)[0]
    assert said and "removed 5" in said[-1]
    after = read_topic(settings, pipeline.dlq_topic)
    expected = [(k, v, h, 1_795_000_000_000 + i) for i, (k, v, h) in enumerate(letters) if i not in doomed_at]
    assert content(after) == expected
    assert [m.offset() for m in after] == list(range(high, high + 6))
    assert [e.id for e in read_dead_letters(settings, pipeline)] == kept_ids
    assert replayed_id in read_replays(settings, pipeline)

    # Again: nothing doomed is left, so nothing changes.
    again = redact(settings, pipeline, lambda e, k: (e, k) in {("products", "1"), ("users", "user-5")})
    assert (again.kept, again.removed, again.unreadable, again.low_watermark) == (6, 0, 2, high)
    assert watermarks(settings, pipeline.dlq_topic) == (high, high + 6)

    # A dead letter parked after the redaction (one of the erased row's too) is untouched until the next run;
    # one of another row survives the next run.
    late = park(settings, pipeline.dlq_topic, [(b'{"id": 3}', b"{later 3", origin(products, 20)),
                                               (b'{"id": 1}', b"{later 1", origin(products, 21))],
                at_ms=1_795_000_100_000)
    assert late == [high + 6, high + 7]
    third = redact(settings, pipeline, lambda e, k: (e, k) == ("products", "1"))
    assert (third.kept, third.removed, third.low_watermark) == (7, 1, high + 8)
    ids = [e.id for e in read_dead_letters(settings, pipeline)]
    assert ids == [*kept_ids, f"{products}:0:20"]
    final = read_topic(settings, pipeline.dlq_topic)
    assert content(final) == [*expected, (b'{"id": 3}', b"{later 3", origin(products, 20), 1_795_000_100_000)]
    # Every copy carries its first id, so the next rewrite names it the same.
    assert all((DLQ_ID, e.encode()) in (m.headers() or []) for m, e in zip(final, ids, strict=True))


def test_a_dead_letter_parked_while_it_runs_is_kept_and_counted_late(
    scratch: tuple[Settings, Pipeline], monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings, pipeline = scratch
    products = f"{pipeline.namespace}pg.public.products"
    park(settings, pipeline.dlq_topic, [(b'{"id": 1}', b"{a", origin(products, 1)),
                                        (b'{"id": 2}', b"{b", origin(products, 2))])
    from changeflow.streams import dlq_redact

    real = dlq_redact.read_to_end
    calls: list[int] = []

    def read_then_park(s: Settings, topic: str, timeout: float = 30.0) -> Any:
        out = real(s, topic, timeout)
        if not calls:  # between noting H and re-writing: a new dead letter of the doomed row, and another
            park(settings, topic, [(b'{"id": 1}', b"{c", origin(products, 3)),
                                   (b'{"id": 4}', b"{d", origin(products, 4))])
        calls.append(1)
        return out

    monkeypatch.setattr(dlq_redact, "read_to_end", read_then_park)
    result = redact(settings, pipeline, lambda e, k: (e, k) == ("products", "1"))
    assert (result.kept, result.removed, result.late, result.highs) == (1, 1, 1, {0: 2})
    assert result.low_watermark == 2
    assert [(m.offset(), m.value()) for m in read_topic(settings, pipeline.dlq_topic)] == [
        (2, b"{c"), (3, b"{d"), (4, b"{b")]


def test_the_erasures_redaction_removes_dead_letters_of_rows_on_the_suppression_list(
    scratch: tuple[Settings, Pipeline],
) -> None:
    settings, pipeline = scratch
    ns = pipeline.namespace
    orders, users = f"{ns}pg.public.orders", f"{ns}mg.people.users"
    secret = erasure_key(settings)
    entries = [Entry(mark(secret, "users", "user-5"), "erase", 1_795_000_000_000, "r1"),
               Entry(mark(secret, "orders", "9"), "anonymise", 1_795_000_000_000, "r1")]
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    admin.create_topics([NewTopic(pipeline.suppression_topic, 1, 1, config=SUPPRESSION_CONFIG)])[
        pipeline.suppression_topic].result(30)
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "acks": "all"})
    for entry in entries:
        producer.produce(pipeline.suppression_topic, key=entry.mark.encode(), value=orjson.dumps(entry.to_json()))
    assert producer.flush(30) == 0
    park(settings, pipeline.dlq_topic, [
        (b'{"id": "\\"user-5\\""}', b"{u5", origin(users, 1)),
        (b'{"id": 9}', b"{o9", origin(orders, 2)),
        (b'{"id": "\\"user-6\\""}', b"{u6", origin(users, 3)),
        (b"orders:10", b"avro", quarantined(f"{ns}.orders", 4, "redis", "orders", "10")),
        (b"orders:9", b"avro", quarantined(f"{ns}.orders", 5, "redis", "orders", "9")),
    ])
    said: list[str] = []
    result = redact_suppressed(settings, pipeline, said.append)
    assert result is not None
    assert (result.kept, result.removed, result.unreadable, result.low_watermark) == (2, 3, 0, 5)
    assert [m.value() for m in read_topic(settings, pipeline.dlq_topic)] == [b"{u6", b"avro"]
    assert [e.id for e in read_dead_letters(settings, pipeline)] == [f"{users}:0:3", f"{ns}.orders:0:4"]
