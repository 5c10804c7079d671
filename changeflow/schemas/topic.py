"""The schema topic: where every canonical schema version is kept (compacted, one partition), the I/O edge
of ``schemas``. Any Kafka consumer can read it the same way to decode the canonical topics."""

from __future__ import annotations

import uuid

from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from changeflow.schemas import SchemaVersion


def ensure_topic(bootstrap: str, topic: str, timeout: float = 15.0) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    if topic in admin.list_topics(timeout=timeout).topics:
        return
    new = NewTopic(topic, num_partitions=1, replication_factor=1,
                   config={"cleanup.policy": "compact", "min.compaction.lag.ms": "0"})
    for future in admin.create_topics([new], operation_timeout=timeout).values():
        try:
            future.result()
        except Exception as exc:  # a concurrent worker created it first
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise


def read_versions(bootstrap: str, topic: str, timeout: float = 15.0) -> list[SchemaVersion]:
    """Every version in the topic, read from the start up to its end (no consumer group)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"schema-reader-{uuid.uuid4().hex}",
                         "enable.auto.commit": False, "enable.partition.eof": True})
    try:
        try:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=timeout)
        except Exception:
            return []
        if high <= low:
            return []
        consumer.assign([TopicPartition(topic, 0, low)])
        out: list[SchemaVersion] = []
        while True:
            msg = consumer.poll(timeout)
            if msg is None:
                raise TimeoutError(f"reading schema topic {topic} timed out")
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    break
                raise RuntimeError(f"reading schema topic {topic}: {err}")
            if msg.value():
                out.append(SchemaVersion.from_json(msg.value()))  # type: ignore[arg-type]
            if (msg.offset() or 0) + 1 >= high:
                break
        return out
    finally:
        consumer.close()


class Publisher:
    """Writes a new version and waits for the broker's acknowledgement before anything uses it."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.topic = topic
        self._producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True})

    def __call__(self, sv: SchemaVersion) -> None:
        errors: list[str] = []
        self._producer.produce(self.topic, key=sv.registry_key, value=sv.as_json(),
                               on_delivery=lambda err, _m: errors.append(str(err)) if err else None)
        if self._producer.flush(30) or errors:
            raise RuntimeError(f"schema {sv.entity} v{sv.version} not stored in {self.topic}: {errors or 'timeout'}")
