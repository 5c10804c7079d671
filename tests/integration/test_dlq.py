"""Dead letters on the live stack: poison messages are parked with their reason and exact bytes while the
stream goes on, `changeflow dlq list` shows them, and `changeflow dlq replay` sends a fixed one through the
normal path into the stores exactly once."""

from __future__ import annotations

import base64
import json
import random
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import psycopg
import pytest
import redis
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from changeflow.pipelines.spec import Pipeline
from changeflow.settings import Settings
from changeflow.sinks.clickhouse import client_for
from changeflow.sinks.redis import row_key
from changeflow.streams.dlq import REPLAY_OF
from tests.integration.conftest import eventually, redis_url, search_url
from tests.unit.envelopes import encoded, envelope, product_row

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SOURCE = "commerce.public.products"


def changeflow(*args: str) -> subprocess.CompletedProcess[str]:
    """The CLI as a user runs it, in its own process."""
    return subprocess.run(
        [sys.executable, "-m", "changeflow", *args], cwd=REPO, capture_output=True, text=True, timeout=180
    )


def redis_text(rds: redis.Redis, key: str) -> str | None:
    value = rds.get(key)
    return None if value is None else str(value)


def dlq_list() -> dict[str, dict[str, Any]]:
    result = changeflow("dlq", "list", "--format", "json")
    assert result.returncode == 0, result.stderr
    return {e["id"]: e for e in json.loads(result.stdout)}


def produce(settings: Settings, topic: str, key: bytes, value: bytes, partition: int,
            headers: list[tuple[str, str | bytes | None]] | None = None) -> int:
    """Produce one message and return its offset once the broker has acknowledged it."""
    delivered: list[Any] = []
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "acks": "all"})
    producer.produce(topic, key=key, value=value, partition=partition, headers=headers,
                     on_delivery=lambda err, msg: delivered.append(err or msg))
    assert producer.flush(30) == 0
    assert len(delivered) == 1 and not isinstance(delivered[0], Exception), delivered
    offset: int = delivered[0].offset()
    return offset


def replays_in_partition(settings: Settings, topic: str, partition: int, start: int, dead_letter_id: str) -> int:
    """How many messages from ``start`` to the end of one partition carry a replay header for this id."""
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": f"t-{uuid.uuid4().hex}",
                         "enable.auto.commit": False})
    try:
        _, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
        consumer.assign([TopicPartition(topic, partition, start)])
        count, position = 0, start
        deadline = time.monotonic() + 60
        while position < high and time.monotonic() < deadline:
            for msg in consumer.consume(500, 1.0):
                assert msg.error() is None, msg.error()
                offset = msg.offset()
                assert offset is not None
                position = offset + 1
                if (REPLAY_OF, dead_letter_id.encode()) in (msg.headers() or []):
                    count += 1
        assert position >= high, f"read {topic}:{partition} only to {position} of {high}"
        return count
    finally:
        consumer.close()


@pytest.fixture
def pg(pipeline: Settings) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(pipeline.pg_dsn, autocommit=True) as conn:
        yield conn


@pytest.fixture
def rds(pipeline: Settings) -> redis.Redis:
    return redis.Redis.from_url(redis_url(pipeline), decode_responses=True)


@pytest.fixture
def ch(pipeline: Settings) -> Iterator[Any]:
    client = client_for(pipeline)
    yield client
    client.close()


def test_poison_messages_are_listed_with_reason_position_and_exact_bytes_while_the_stream_goes_on(
    pipeline: Settings, pg: psycopg.Connection[Any], rds: redis.Redis, sku_prefix: str
) -> None:
    # One poison message per partition, so whichever partition the next product lands on, a bad
    # message sits in front of it.
    tag = uuid.uuid4().hex
    poison = {
        0: (f"dlq-{tag}-0".encode(), b"{not json"),
        1: (f"dlq-{tag}-1".encode(), encoded(envelope("z", None, product_row(1)))),
        2: (f"dlq-{tag}-2".encode(), b"[1, 2]"),
    }
    offsets = {p: produce(pipeline, SOURCE, key, value, p) for p, (key, value) in poison.items()}
    ids = {p: f"{SOURCE}:{p}:{offsets[p]}" for p in poison}

    row = pg.execute(
        "INSERT INTO products (sku, name, category, price_cents, stock) "
        "VALUES (%s, 'after the poison', 'kitchen', 1234, 3) RETURNING id",
        (f"{sku_prefix}-AFTER",),
    ).fetchone()
    assert row is not None
    pid = int(row[0])
    try:
        cached = json.loads(eventually(lambda: redis_text(rds, f"product:{pid}") or "", timeout=90,
                                       what="product after poison in redis"))
        assert (cached["sku"], cached["price"]) == (f"{sku_prefix}-AFTER", "12.34")

        def all_listed() -> dict[str, dict[str, Any]]:
            listed = dlq_list()
            return listed if all(i in listed for i in ids.values()) else {}

        listed = eventually(all_listed, timeout=60, what="poison in dlq list")
        reasons = {p: listed[ids[p]]["error"] for p in poison}
        assert reasons[0].startswith("not JSON: "), reasons[0]
        assert reasons[1] == "unknown op 'z'"
        assert reasons[2] == "not a JSON object"
        for p, (key, value) in poison.items():
            entry = listed[ids[p]]
            assert (entry["source_topic"], entry["partition"], entry["offset"]) == (SOURCE, p, offsets[p])
            assert base64.b64decode(entry["key_b64"]) == key
            shown = base64.b64decode(entry["value_b64"])
            if p == 1:  # a product image: the field products drop is masked in the listing (README "dlq list")
                original = json.loads(value)
                original["payload"]["after"]["internal_notes"] = "<masked>"
                assert json.loads(shown) == original and b"<masked>" in shown
            else:
                assert shown == value  # nothing to mask: the exact bytes
            assert (entry["key_size"], entry["value_size"]) == (len(key), len(shown))
            assert entry["replayed"] is False
            assert entry["dead_at"].endswith("Z")
        assert listed[ids[0]]["value_preview"] == "{not json"

        # Listing commits nothing and joins no group: a second listing sees the same letters.
        again = dlq_list()
        assert all(again[i]["dlq_offset"] == listed[i]["dlq_offset"] for i in ids.values())
        groups = AdminClient({"bootstrap.servers": pipeline.kafka_bootstrap}).list_consumer_groups().result(30)
        assert not [g.group_id for g in groups.valid if g.group_id.startswith("changeflow-dlq-reader-")]

        table = changeflow("dlq", "list", "--limit", "1000")
        assert table.returncode == 0, table.stderr
        assert ids[1] in table.stdout
        assert "unknown op 'z'" in table.stdout
    finally:
        pg.execute("DELETE FROM products WHERE id = %s", (pid,))


def test_a_corrupted_canonical_message_is_a_dead_letter_of_each_sink_and_the_stores_go_on(
    pipeline: Settings, commerce: Pipeline, pg: psycopg.Connection[Any], rds: redis.Redis, sku_prefix: str
) -> None:
    """Bytes in a canonical topic that no schema decodes (truncated Avro, a wrong fingerprint, no marker):
    every sink dead-letters them with the reason and goes on; a product written afterwards reaches all three
    stores."""
    canonical = commerce.entity("products").canonical_topic
    tag = uuid.uuid4().hex
    corrupt = {
        0: b"\xc3\x01" + b"\x00" * 8 + b"\xff\xff",      # the marker, an unknown fingerprint
        1: b"\xc3\x01",                                   # truncated inside the header
        2: b"plain text, not Avro",
    }
    offsets = {p: produce(pipeline, canonical, f"products:corrupt-{tag}-{p}".encode(), value, p)
               for p, value in corrupt.items()}
    ids = {p: f"{canonical}:{p}:{offsets[p]}" for p in corrupt}
    row = pg.execute("INSERT INTO products (sku, name, category, price_cents, stock) "
                     "VALUES (%s, 'after the corruption', 'tools', 990, 1) RETURNING id", (f"{sku_prefix}-CORR",)
                     ).fetchone()
    assert row is not None
    pid = int(row[0])
    try:
        eventually(lambda: redis_text(rds, f"product:{pid}"), timeout=90, what="product after corruption in redis")
        eventually(lambda: httpx.get(f"{search_url(pipeline)}/products/_doc/{pid}", timeout=5).status_code == 200,
                   timeout=90, what="product in search")
        ch = client_for(pipeline)
        try:
            eventually(lambda: ch.query("SELECT count() FROM changeflow.products FINAL WHERE id = {id:Int64}",
                                        parameters={"id": pid}).result_rows == [(1,)], timeout=90,
                       what="product in clickhouse")
        finally:
            ch.close()

        def letters() -> list[dict[str, Any]]:
            result = changeflow("dlq", "list", "--format", "json")
            assert result.returncode == 0, result.stderr
            found = [e for e in json.loads(result.stdout) if e["id"] in ids.values()]
            return found if len(found) == len(ids) else []

        found = eventually(letters, timeout=90, what="corrupted messages in the dlq")
        assert all("undecodable canonical record" in e["error"] for e in found), found
        # Each of the three sinks met them and dead-lettered them: one entry per origin, three copies.
        eventually(lambda: all(e["copies"] == 3 for e in letters()), timeout=60, what="a copy from every sink")
        assert {(e["source_topic"], e["partition"], e["offset"]) for e in found} == {
            (canonical, p, offsets[p]) for p in corrupt}
        assert {e["id"]: base64.b64decode(e["value_b64"]) for e in found} == {ids[p]: corrupt[p] for p in corrupt}
    finally:
        pg.execute("DELETE FROM products WHERE id = %s", (pid,))


def test_fixed_dead_letter_replays_into_the_stores_once(
    pipeline: Settings, commerce: Pipeline, pg: psycopg.Connection[Any], rds: redis.Redis, ch: Any, sku_prefix: str
) -> None:
    # A products change that was dead-lettered for a cause since fixed: its bytes now decode.
    pid = 9_000_000_000 + random.randrange(1_000_000_000)
    lsn_row = pg.execute("SELECT (pg_current_wal_lsn() - '0/0')::bigint").fetchone()
    assert lsn_row is not None
    lsn = int(lsn_row[0])  # a real, current position: newer than anything for this new key
    sku = f"{sku_prefix}-REPLAY"
    value = encoded(envelope("c", None, product_row(pid, sku=sku, name="replayed kettle", price_cents=2599),
                             lsn=lsn, ts_ms=int(time.time() * 1000)))
    key = orjson.dumps({"schema": {"type": "struct", "fields": [
        {"type": "int64", "optional": False, "default": 0, "field": "id"}], "optional": False,
        "name": "commerce.public.products.Key"}, "payload": {"id": pid}})
    partition = pid % 3
    origin_offset = 9_000_000_000_000 + random.randrange(1_000_000_000)  # a position no real message has
    dead_id = f"{SOURCE}:{partition}:{origin_offset}"
    produce(pipeline, commerce.dlq_topic, key, value, 0, headers=[
        ("changeflow.source_topic", SOURCE.encode()),
        ("changeflow.partition", str(partition).encode()),
        ("changeflow.offset", str(origin_offset).encode()),
        ("changeflow.error", b"KeyError: 'price_cents'"),
    ])
    redis_key = row_key(commerce.entities["products"], str(pid))
    versions_key = f"{commerce.namespace}:versions"
    try:
        entry: dict[str, Any] = eventually(lambda: dlq_list().get(dead_id) or {}, timeout=30,
                                           what="crafted dead letter listed")
        assert entry["error"] == "KeyError: 'price_cents'"
        assert entry["replayed"] is False
        assert rds.get(redis_key) is None

        first = changeflow("dlq", "replay", "--id", dead_id, "--format", "json")
        assert first.returncode == 0, first.stderr
        outcome = json.loads(first.stdout)
        assert outcome["skipped"] == []
        [sent] = outcome["replayed"]
        assert (sent["id"], sent["topic"], sent["partition"]) == (dead_id, SOURCE, partition)

        cached = json.loads(eventually(lambda: redis_text(rds, redis_key) or "", timeout=90,
                                       what="replayed product in redis"))
        assert {k: cached[k] for k in ("id", "sku", "name", "price", "stock")} == {
            "id": pid, "sku": sku, "name": "replayed kettle", "price": "25.99", "stock": 5,
        }
        assert "internal_notes" not in cached
        ch_rows = eventually(lambda: ch.query(
            "SELECT sku, price, _version FROM changeflow.products FINAL WHERE id = {id:Int64}",
            parameters={"id": pid}).result_rows, timeout=90, what="replayed product in clickhouse")
        assert [(r[0], str(r[1]), r[2]) for r in ch_rows] == [(sku, "25.99", lsn)]
        raw_before = rds.get(redis_key)
        version_before = rds.hget(versions_key, redis_key)
        assert version_before == f"{lsn:020d}"

        assert dlq_list()[dead_id]["replayed"] is True

        # Again: skipped, nothing sent, nothing changes.
        second = changeflow("dlq", "replay", "--id", dead_id)
        assert second.returncode == 0, second.stderr
        assert "1 skipped" in second.stdout and "0 replayed" in second.stdout
        assert "already replayed at" in second.stdout
        assert replays_in_partition(pipeline, SOURCE, partition, sent["offset"], dead_id) == 1
        assert rds.get(redis_key) == raw_before
        assert rds.hget(versions_key, redis_key) == version_before

        # A typo is an error, and replays nothing.
        unknown = changeflow("dlq", "replay", "--id", f"{SOURCE}:{partition}:1{origin_offset}")
        assert unknown.returncode == 1
        assert f"unknown dead-letter id: {SOURCE}:{partition}:1{origin_offset}" in unknown.stderr
    finally:
        # The row never existed in PostgreSQL: retract it the way the source would, with a newer delete
        # through the pipeline, so every store (and any later full replay) ends without it.
        delete = encoded(envelope("d", product_row(pid, sku=sku), None, lsn=lsn + 1, ts_ms=int(time.time() * 1000)))
        produce(pipeline, SOURCE, key, delete, partition)
        eventually(lambda: rds.get(redis_key) is None, timeout=90, what="retracted from redis")
        eventually(lambda: not ch.query("SELECT 1 FROM changeflow.products FINAL WHERE id = {id:Int64}",
                                        parameters={"id": pid}).result_rows, timeout=90, what="retracted from ch")
        eventually(lambda: httpx.get(f"{search_url(pipeline)}/products/_doc/{pid}", timeout=10).status_code == 404,
                   timeout=90, what="retracted from search")
