"""Debezium signals through the signal table: how far an incremental snapshot for rebuild or repair got.

The signals themselves are written by ``sinks.rebuild`` and ``reports.reconcile.repair`` into the
pipeline's signal table (``Pipeline.signal_table``, values bound as parameters); Debezium reports each
one's progress on the pipeline's notifications topic (``Pipeline.notifications_topic``), read here.

An incremental snapshot re-reads rows from PostgreSQL in chunks while streaming goes on; Debezium
interleaves them with live changes using watermarks in the signal table, so a rebuilt store converges
without stopping the pipeline. Each snapshot row arrives as an ``op=r`` change and passes the same version
guards as any other record.
"""

from __future__ import annotations

import uuid

import orjson
from confluent_kafka import Consumer, TopicPartition


class SnapshotFailedError(RuntimeError):
    pass


def snapshot_state(bootstrap: str, topic: str, signal_id: str) -> str | None:
    """The latest notification type Debezium sent for this signal (STARTED, IN_PROGRESS, COMPLETED,
    ABORTED...), read from the connector's notification topic (`notification.enabled.channels=sink`)."""

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"changeflow-notifications-{uuid.uuid4().hex}",
                         "enable.auto.commit": False})
    try:
        metadata = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if metadata is None or metadata.error is not None:
            return None
        ends = {}
        parts = []
        for p in metadata.partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            if high > low:
                ends[p] = high
                parts.append(TopicPartition(topic, p, low))
        consumer.assign(parts)
        state = None
        while ends:
            msg = consumer.poll(5)
            if msg is None:
                break
            if msg.error() is not None:
                continue
            if (msg.offset() or 0) + 1 >= ends.get(msg.partition() or 0, 0):
                ends.pop(msg.partition(), None)
            raw = msg.value()
            value = orjson.loads(raw) if raw else None
            payload = value.get("payload", value) if isinstance(value, dict) else None
            if isinstance(payload, dict) and payload.get("id") == signal_id:
                state = str(payload.get("type"))
        return state
    finally:
        consumer.close()
