"""Moving a sink's consumer group, for replays: the thin Kafka edge behind `changeflow sinks reset`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition
from confluent_kafka.admin import AdminClient

from sinks.runner import canonical_topics, group_id

if TYPE_CHECKING:
    from changeflow.settings import Settings


class GroupActiveError(RuntimeError):
    """The group still has members (a worker is running); offsets can only move while it is empty."""


def reset_to_earliest(settings: Settings, sink: str) -> dict[str, int]:
    """Point ``sink``'s group at the start of every canonical partition; returns messages to replay per topic."""
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    group = group_id(sink)
    described = admin.describe_consumer_groups([group])[group].result()
    if described.members:
        raise GroupActiveError(
            f"consumer group {group} has {len(described.members)} active member(s): stop the worker "
            "(`changeflow stack down worker` or Ctrl-C) before resetting offsets"
        )
    from confluent_kafka import Consumer

    probe = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": f"{group}-probe"})
    try:
        metadata = probe.list_topics(timeout=10)
        partitions: list[TopicPartition] = []
        replay: dict[str, int] = {}
        for topic in canonical_topics(settings):
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
