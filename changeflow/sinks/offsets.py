"""Moving a sink's consumer group, for replays: the thin Kafka edge behind `changeflow sinks reset`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient

from changeflow.pipelines.spec import Pipeline
from changeflow.sinks.runner import canonical_topics

if TYPE_CHECKING:
    from changeflow.settings import Settings


class GroupActiveError(RuntimeError):
    """The group still has members (a worker is running); offsets can only move while it is empty."""


def reset_to_earliest(settings: Settings, pipeline: Pipeline, store: str) -> dict[str, int]:
    """Point ``store``'s sink group at the start of every canonical partition it reads; returns messages to
    replay per topic."""
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    group = pipeline.sink_group(store)
    described = admin.describe_consumer_groups([group])[group].result()
    if described.members:
        raise GroupActiveError(
            f"consumer group {group} has {len(described.members)} active member(s): stop the worker "
            "(`changeflow stack down worker` or Ctrl-C) before resetting offsets"
        )
    probe = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": f"{group}-probe"})
    try:
        metadata = probe.list_topics(timeout=10)
        partitions: list[TopicPartition] = []
        replay: dict[str, int] = {}
        for topic in canonical_topics(pipeline, store):
            if topic not in metadata.topics:
                continue
            for p in metadata.topics[topic].partitions:
                low, high = probe.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
                partitions.append(TopicPartition(topic, p, low))
                replay[topic] = replay.get(topic, 0) + high - low
    finally:
        probe.close()
    futures = admin.alter_consumer_group_offsets([ConsumerGroupTopicPartitions(group, partitions)])
    for future in futures.values():
        future.result()
    return replay


def topic_partitions(consumer: Consumer, topics: Sequence[str]) -> list[TopicPartition]:
    """Every partition of those ``topics`` that exist, in order (a topic not created yet has none)."""
    metadata = consumer.list_topics(timeout=10)
    return [TopicPartition(t, p) for t in topics if t in metadata.topics for p in sorted(metadata.topics[t].partitions)]


def group_lag(settings: Settings, group: str, topics: list[str]) -> int | None:
    """Messages in ``topics`` not yet committed by ``group`` (uncommitted partitions count from the start)."""
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": group,
                         "enable.auto.commit": False})
    try:
        committed = consumer.committed(topic_partitions(consumer, topics), timeout=10)
        lag = 0
        for tp in committed:
            low, high = consumer.get_watermark_offsets(TopicPartition(tp.topic, tp.partition), timeout=10)
            position = tp.offset if tp.offset >= 0 else low
            lag += max(0, high - position)
        return lag
    except KafkaException:
        return None
    finally:
        consumer.close()
