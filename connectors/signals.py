"""Debezium signals through the signal table: incremental snapshots for rebuild and repair.

An incremental snapshot re-reads rows from PostgreSQL in chunks while streaming goes on; Debezium
interleaves them with live changes using watermarks in the signal table, so a rebuilt store converges
without stopping the pipeline. Each snapshot row arrives as an ``op=r`` change and passes the same version
guards as any other record.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import orjson
import psycopg

SIGNAL_TABLE = "public.debezium_signal"


def request_incremental_snapshot(
    dsn: str, tables: Sequence[str], where: dict[str, str] | None = None
) -> str:
    """Ask the connector to re-read ``tables`` (``public.products``...), optionally only rows matching
    a SQL condition per table (Debezium's ``additional-conditions``); returns the signal id."""
    data: dict[str, object] = {"data-collections": list(tables), "type": "incremental"}
    if where:
        data["additional-conditions"] = [{"data-collection": t, "filter": f} for t, f in where.items()]
    signal_id = f"changeflow-{uuid.uuid4()}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            f"INSERT INTO {SIGNAL_TABLE} (id, type, data) VALUES (%s, 'execute-snapshot', %s)",
            (signal_id, orjson.dumps(data).decode()),
        )
    return signal_id


def key_filter(column: str, keys: Sequence[str], numeric: bool) -> str:
    """A safe SQL condition selecting exactly these keys (values quoted or checked as integers)."""
    if numeric:
        values = ", ".join(str(int(k)) for k in keys)
    else:
        values = ", ".join("'" + k.replace("'", "''") + "'" for k in keys)
    return f"{column} IN ({values})"


NOTIFICATIONS_TOPIC = "changeflow.debezium.notifications"


class SnapshotFailedError(RuntimeError):
    pass


def snapshot_state(bootstrap: str, signal_id: str) -> str | None:
    """The latest notification type Debezium sent for this signal (STARTED, IN_PROGRESS, COMPLETED,
    ABORTED...), read from the connector's notification topic (`notification.enabled.channels=sink`)."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "changeflow-notifications",
                         "enable.auto.commit": False})
    try:
        metadata = consumer.list_topics(NOTIFICATIONS_TOPIC, timeout=10).topics.get(NOTIFICATIONS_TOPIC)
        if metadata is None or metadata.error is not None:
            return None
        ends = {}
        parts = []
        for p in metadata.partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(NOTIFICATIONS_TOPIC, p), timeout=10)
            if high > low:
                ends[p] = high
                parts.append(TopicPartition(NOTIFICATIONS_TOPIC, p, low))
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
