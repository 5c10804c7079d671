"""Issue 20 §8: dead letters are kept until replayed or dropped, and a retention gap of the decode stage is
said as CHANGES LOST, like a sink's. Against the live Kafka."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic, ResourceType

from changeflow.pipelines.load import parse
from changeflow.pipelines.spec import Pipeline
from changeflow.reports.status import collect
from changeflow.settings import Settings
from changeflow.worker import ensure_topics

pytestmark = pytest.mark.integration


@pytest.fixture
def scratch(live_stack: Settings) -> Iterator[tuple[Pipeline, AdminClient]]:
    name = f"gap_{uuid.uuid4().hex[:8]}"
    pipeline = parse(f"name: {name}\nsources:\n  postgres:\n    database: commerce\nentities:\n"
                     "  things:\n    table: public.things\n", f"{name}.yml")
    admin = AdminClient({"bootstrap.servers": live_stack.kafka_bootstrap})
    try:
        yield pipeline, admin
    finally:
        topics = [t for t in admin.list_topics(timeout=10).topics if t.startswith(f"{name}.")]
        for future in (admin.delete_topics(topics).values() if topics else []):
            future.result()
        for future in admin.delete_consumer_groups([pipeline.decode_group]).values():
            with contextlib.suppress(Exception):  # never created: nothing to delete
                future.result()


def topic_config(admin: AdminClient, topic: str) -> dict[str, str]:
    (future,) = admin.describe_configs([ConfigResource(ResourceType.TOPIC, topic)]).values()
    return {name: entry.value for name, entry in future.result().items()}


def test_the_dead_letter_topic_keeps_its_records_until_replayed_or_dropped(
        live_stack: Settings, scratch: tuple[Pipeline, AdminClient]) -> None:
    pipeline, admin = scratch
    # Made by an earlier version with the broker's 7-day retention: the next worker start fixes it.
    for future in admin.create_topics([NewTopic(pipeline.dlq_topic, 1, 1, config={"retention.ms": "604800000"})]
                                      ).values():
        future.result()
    ensure_topics(live_stack, pipeline)
    config = topic_config(admin, pipeline.dlq_topic)
    assert (config["retention.ms"], config["retention.bytes"]) == ("-1", "-1")


def test_a_retention_gap_of_the_decode_stage_is_changes_lost(live_stack: Settings,
                                                             scratch: tuple[Pipeline, AdminClient]) -> None:
    pipeline, admin = scratch
    ensure_topics(live_stack, pipeline)
    (raw,) = pipeline.raw_topics()
    assert topic_config(admin, pipeline.dlq_topic)["retention.ms"] == "-1"  # created with it
    producer = Producer({"bootstrap.servers": live_stack.kafka_bootstrap})
    for i in range(5):
        producer.produce(raw, key=b"k", value=f"change {i}".encode(), partition=0)
    assert producer.flush(30) == 0
    # The decode group has read the first record; retention then deletes three it never decoded.
    consumer = Consumer({"bootstrap.servers": live_stack.kafka_bootstrap, "group.id": pipeline.decode_group,
                         "enable.auto.commit": False})
    try:
        consumer.commit(offsets=[TopicPartition(raw, 0, 1)], asynchronous=False)
    finally:
        consumer.close()
    for future in admin.delete_records([TopicPartition(raw, 0, 4)]).values():
        future.result()

    status = collect(live_stack, pipeline)
    lost = [e for e in status.errors if e.startswith("CHANGES LOST: the decode stage")]
    assert lost == [f"CHANGES LOST: the decode stage (group {pipeline.decode_group}) is behind the raw topics' "
                    f"retention: 3 change(s) were deleted before it decoded them ({raw}[0] committed 1 < earliest "
                    "4). No store has them: run `changeflow reconcile --repair`, or rebuild each store from the "
                    "source (`changeflow rebuild <store>`)"]
    assert not status.healthy
