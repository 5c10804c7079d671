"""An outbox's events in ClickHouse, one row per event id, for reporting (README "Outbox and events").

``<database>.outbox_<name>`` (the pipeline's ClickHouse database) is a ``ReplacingMergeTree`` ordered by the
event id: a redelivered, replayed or re-snapshotted event is inserted again and collapses into its first row
(read with ``FINAL``, as every changeflow table). The routed topics and the outbox DLQ are both read, so an
unroutable event is reported too (its ``topic`` says where it is). Offsets are committed only after the insert.

The ClickHouse client is the caller's (``sinks.clickhouse.client_for``): this layer sits below the stores.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import Consumer

from changeflow.outbox.events import BadEvent, Event, from_message, next_message, stopping
from changeflow.pipelines.outbox import OutboxSpec, event_log_table

log = logging.getLogger("changeflow.outbox.eventlog")

COLUMNS = ("event_id", "topic", "partition", "offset", "aggregate_type", "aggregate_id", "type", "payload",
           "headers")


def quote(name: str) -> str:
    """A ClickHouse identifier; the names here are the pipeline's own (identifiers), checked, not escaped."""
    if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
        raise ValueError(f"{name!r} is not an identifier")
    return f"`{name}`"


def table_name(spec: OutboxSpec) -> str:
    return event_log_table(spec)


def ddl(database: str, spec: OutboxSpec) -> list[str]:
    return [
        f"CREATE DATABASE IF NOT EXISTS {quote(database)}",
        f"CREATE TABLE IF NOT EXISTS {quote(database)}.{quote(table_name(spec))} (\n"
        "  event_id String, topic String, partition UInt32, offset UInt64,\n"
        "  aggregate_type Nullable(String), aggregate_id Nullable(String), type Nullable(String),\n"
        "  payload Nullable(String), headers Map(String, String),\n"
        "  loaded_at DateTime64(3, 'UTC') DEFAULT now64(3)\n"
        ")\nENGINE = ReplacingMergeTree\nORDER BY event_id",
    ]


def row(event: Event) -> list[Any]:
    """The event as its row: the payload as JSON text (a string payload as it was sent)."""
    payload = event.payload if isinstance(event.payload, str) or event.payload is None else json.dumps(
        event.payload, default=str, separators=(",", ":"))
    headers = {k: v for k, v in event.headers.items() if not k.startswith("__debezium")}
    return [event.id, event.topic, event.partition, event.offset, event.aggregate_type, event.aggregate_id,
            event.type, payload, headers]


def load(client: Any, bootstrap: str, database: str, spec: OutboxSpec, group: str, *,
         stop: Callable[[int], bool], batch: int = 500, poll_s: float = 0.5) -> int:
    """Insert every event of the outbox's topics into its table until ``stop(rows so far)``; the rows inserted.
    A message that is no event is logged and passed over."""
    for statement in ddl(database, spec):
        client.command(statement)
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False,
                         "auto.offset.reset": "earliest", "topic.metadata.refresh.interval.ms": 2000,
                         "log_level": 3})
    inserted = 0
    try:
        consumer.subscribe([f"^{re.escape(spec.topic_prefix)}\\..+", spec.dlq_topic])
        started = time.monotonic()
        while not stopping(consumer, stop, inserted, started):
            rows: list[list[Any]] = []
            last = None
            while len(rows) < batch:
                message = next_message(consumer, poll_s)
                if message is None:
                    break
                last = message
                try:
                    rows.append(row(from_message(message)))
                except BadEvent as exc:
                    log.warning("outbox_bad_event reason=%s", exc)
            if rows:
                client.insert(table_name(spec), rows, database=database, column_names=list(COLUMNS))
                inserted += len(rows)
            if last is not None:
                consumer.commit(asynchronous=False)
    finally:
        consumer.close()
    return inserted
