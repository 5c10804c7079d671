"""The consumer side of the outbox: apply each event exactly once to a service's own PostgreSQL database.

Delivery is at least once (Debezium, Kafka, a rewound offset, a re-snapshot re-emitting retained outbox rows),
so a consumer records every event id it has applied in its own inbox table, in the same transaction as the
state change the event causes (debezium-examples ``outbox``: a ``MessageLog`` keyed by event id). A second
delivery finds the id and changes nothing; a crash before the commit leaves neither the change nor the id, and
the event is applied on redelivery::

    inbox = Inbox("public.inbox")
    with psycopg.connect(dsn) as conn:
        inbox.create(conn)
        def apply(cur, event):            # the service's own change, on the inbox's transaction
            cur.execute("UPDATE orders_seen SET n = n + 1 WHERE id = %s", (event.aggregate_id,))
        consume(settings.kafka_bootstrap, "billing", ["shop.events.order"], conn, inbox, apply)

Offsets are committed only after the transaction, so nothing is lost when the consumer stops; the inbox makes
the redelivered remainder harmless. Two consumers racing on one event id serialise on the inbox row's
primary key: the second waits for the first's commit, then finds the id.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import psycopg
from confluent_kafka import Consumer
from psycopg import sql

from changeflow.outbox.events import BadEvent, Event, from_message, next_message, stopping

log = logging.getLogger("changeflow.outbox.inbox")

Handler = Callable[[psycopg.Cursor, Event], None]


class Inbox:
    """An inbox table ``(event_id text PRIMARY KEY, topic, aggregate_id, event_type, applied_at)``."""

    def __init__(self, table: str = "public.inbox") -> None:
        schema, _, name = table.rpartition(".")
        self.table = sql.Identifier(schema or "public", name)

    def create(self, conn: psycopg.Connection) -> None:
        with conn.transaction():
            conn.execute(sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (event_id text PRIMARY KEY, topic text NOT NULL, "
                "aggregate_id text, event_type text, applied_at timestamptz NOT NULL DEFAULT now())"
            ).format(self.table))

    def seen(self, conn: psycopg.Connection, event_id: str) -> bool:
        row = conn.execute(sql.SQL("SELECT 1 FROM {} WHERE event_id = %s").format(self.table), (event_id,))
        return row.fetchone() is not None

    def apply(self, conn: psycopg.Connection, event: Event, handler: Handler) -> bool:
        """Run ``handler`` and record the event id in one transaction; False (and nothing run) when the id is
        already recorded. An exception from the handler rolls both back and propagates. On a connection with no
        transaction open this is its own transaction, committed on return; inside the caller's transaction it
        is a savepoint, made durable by the caller's commit."""
        with conn.transaction(), conn.cursor() as cur:
            cur.execute(sql.SQL("INSERT INTO {} (event_id, topic, aggregate_id, event_type) VALUES (%s, %s, %s, %s) "
                                "ON CONFLICT (event_id) DO NOTHING RETURNING event_id").format(self.table),
                        (event.id, event.topic, event.aggregate_id, event.type))
            if cur.fetchone() is None:
                return False
            handler(cur, event)
        return True


@dataclass
class Counts:
    applied: int = 0
    duplicates: int = 0
    bad: int = 0


def consume(bootstrap: str, group: str, topics: Sequence[str], conn: psycopg.Connection, inbox: Inbox,
            handler: Handler, *, stop: Callable[[Counts], bool] = lambda c: False,
            on_bad: Callable[[BadEvent], None] | None = None, poll_s: float = 0.5,
            offset_reset: str = "earliest") -> Counts:
    """Apply every event of ``topics`` through ``inbox`` until ``stop(counts)`` is true, committing each
    message's offset after its transaction. A message that is no event (BadEvent) is counted, handed to
    ``on_bad`` (default: logged) and passed over; a handler's exception stops the loop uncommitted."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False,
                         "auto.offset.reset": offset_reset})
    counts = Counts()
    try:
        consumer.subscribe(list(topics))
        started = time.monotonic()
        while not stopping(consumer, stop, counts, started):
            message = next_message(consumer, poll_s)
            if message is None:
                continue
            try:
                event = from_message(message)
            except BadEvent as exc:
                counts.bad += 1
                (on_bad or (lambda e: log.warning("outbox_bad_event reason=%s", e)))(exc)
            else:
                if inbox.apply(conn, event, handler):
                    counts.applied += 1
                else:
                    counts.duplicates += 1
            consumer.commit(message=message, asynchronous=False)
    finally:
        consumer.close()
    return counts
