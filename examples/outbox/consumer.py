"""A consumer service of the outbox example: keeps each customer's order total in its own PostgreSQL database.

Its change is an increment, which a second delivery would double; the inbox makes each event count once,
across redeliveries, an offset rewind, a connector restart and a re-snapshot::

    python -m examples.outbox.consumer --dsn postgresql://.../billing --topic shop.events.order \\
        --group billing [--idle 10]

``--idle S`` stops after S seconds without a message (for demos and tests); without it the consumer runs until
interrupted. It prints ``applied=N duplicates=N bad=N`` at the end.
"""

from __future__ import annotations

import argparse

import psycopg

from changeflow.outbox.events import Event, idle_stop
from changeflow.outbox.inbox import Counts, Inbox, consume
from changeflow.settings import Settings

SCHEMA = ("CREATE TABLE IF NOT EXISTS public.customer_totals (customer text PRIMARY KEY, "
          "total_cents bigint NOT NULL, orders integer NOT NULL)")


def apply(cur: psycopg.Cursor, event: Event) -> None:
    """The service's own state change for one event (not idempotent by itself: the inbox makes it so)."""
    if event.type != "order_placed":
        return
    data = event.data
    cur.execute("INSERT INTO public.customer_totals AS t VALUES (%s, %s, 1) ON CONFLICT (customer) DO UPDATE "
                "SET total_cents = t.total_cents + EXCLUDED.total_cents, orders = t.orders + 1",
                (data["customer"], int(data["total_cents"])))


def main(argv: list[str] | None = None) -> Counts:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dsn", required=True, help="The consumer's own database (its inbox lives there).")
    parser.add_argument("--topic", action="append", required=True, help="Events topic (repeatable).")
    parser.add_argument("--group", default="billing", help="Kafka consumer group.")
    parser.add_argument("--idle", type=float, default=None, help="Stop after this many idle seconds.")
    args = parser.parse_args(argv)
    inbox = Inbox("public.inbox")
    idle = idle_stop(args.idle)

    def stop(counts: Counts) -> bool:
        return idle(counts.applied + counts.duplicates + counts.bad)

    with psycopg.connect(args.dsn, autocommit=True) as conn:
        inbox.create(conn)
        conn.execute(SCHEMA)
        counts = consume(Settings().kafka_bootstrap, args.group, args.topic, conn, inbox, apply, stop=stop)
    print(f"applied={counts.applied} duplicates={counts.duplicates} bad={counts.bad}", flush=True)
    return counts


if __name__ == "__main__":
    main()
