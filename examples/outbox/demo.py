"""The outbox demo (`make demo-outbox`): orders written with their events through the outbox, a consumer
applying them once, then a replay from offset 0 that applies none of them again.

On the native stack: creates the databases ``shop`` (the service, examples/outbox/schema.sql) and ``billing``
(the consumer's own), registers the example pipeline's connector (``connectors apply``), writes ``--orders``
orders (each with its event in one transaction, plus one rolled back), runs the example consumer, then runs
it again under a new consumer group. Remove it all with ``changeflow --pipeline examples/outbox/pipeline.yml
connectors delete --yes --purge`` and dropping the two databases.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psycopg
from psycopg import sql

from changeflow.settings import Settings
from examples.outbox import consumer

HERE = Path(__file__).resolve().parent
PIPELINE = HERE / "pipeline.yml"


def _database(settings: Settings, name: str) -> str:
    with psycopg.connect(settings.pg_dsn, autocommit=True) as admin:
        if admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return psycopg.conninfo.make_conninfo(settings.pg_dsn, dbname=name)


def _wait_for_topic(settings: Settings, topic: str, timeout: float = 120) -> None:
    """The routed topic exists once Debezium has published its first event (a consumer subscribing before
    that would not see it until its next metadata refresh)."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap, "log_level": 3})
    deadline = time.monotonic() + timeout
    while topic not in admin.list_topics(timeout=10).topics:
        if time.monotonic() > deadline:
            sys.exit(f"no events on {topic} after {timeout:.0f} s: see `changeflow connectors status`")
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--orders", type=int, default=20)
    args = parser.parse_args(argv)
    settings = Settings()
    shop, billing = _database(settings, "shop"), _database(settings, "billing")
    with psycopg.connect(shop, autocommit=True) as conn:
        conn.execute((HERE / "schema.sql").read_text())
    applied = subprocess.run([sys.executable, "-m", "changeflow", "--pipeline", str(PIPELINE), "connectors",
                              "apply"], check=False)
    if applied.returncode != 0:
        sys.exit("connectors apply failed (above)")
    run = uuid.uuid4().hex[:6]
    customers = ["ada", "bob", "cy"]
    with psycopg.connect(shop) as conn:
        start = int(time.time() * 1000)
        for i in range(args.orders):
            order_id, customer, total = start + i, customers[i % 3], 100 * (i + 1)
            conn.execute("INSERT INTO public.orders (id, customer, total_cents) VALUES (%s, %s, %s)",
                         (order_id, customer, total))
            conn.execute("INSERT INTO public.outbox_messages (aggregate_type, aggregate_id, event_type, payload, "
                         "trace_id) VALUES ('order', %s, 'order_placed', %s, %s)",
                         (str(order_id), json.dumps({"customer": customer, "total_cents": total}), run))
            conn.commit()  # the order and its event: one transaction
        conn.execute("INSERT INTO public.orders (id, customer, total_cents) VALUES (%s, 'nobody', 1)", (start - 1,))
        conn.execute("INSERT INTO public.outbox_messages (aggregate_type, aggregate_id, event_type, payload) "
                     "VALUES ('order', %s, 'order_placed', '{\"customer\": \"nobody\", \"total_cents\": 1}')",
                     (str(start - 1),))
        conn.rollback()  # neither the order nor its event exists
    print(f"wrote {args.orders} orders with their events (and rolled one back)", flush=True)
    topic = "shop.events.order"
    _wait_for_topic(settings, topic)
    first = consumer.main(["--dsn", billing, "--topic", topic, "--group", "billing", "--idle", "8"])
    again = consumer.main(["--dsn", billing, "--topic", topic, "--group", f"billing-replay-{run}", "--idle", "8"])
    with psycopg.connect(billing) as conn:
        totals = conn.execute("SELECT customer, total_cents, orders FROM public.customer_totals "
                              "ORDER BY customer").fetchall()
    for customer, total, orders in totals:
        print(f"  {customer}: {orders} orders, {total} cents", flush=True)
    if first.applied < args.orders or again.applied != 0:
        sys.exit(f"expected {args.orders} applied then 0 on the replay; got {first.applied} and {again.applied}")
    print(f"applied once: {first.applied} events the first time, 0 of {again.duplicates} on the replay from "
          "offset 0 (the inbox already had them)", flush=True)


if __name__ == "__main__":
    main()
