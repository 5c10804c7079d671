"""The demo workload, as a shop's services would write it: products inserted, updated and deleted; orders
with their payments and refunds, and a few finance exceptions planted on purpose."""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import orjson
import psycopg
from confluent_kafka import Producer
from psycopg.types.json import Jsonb

CATEGORIES = ("books", "garden", "kitchen", "toys", "tools", "music")
ADJECTIVES = ("red", "quiet", "solid", "tiny", "golden", "rapid", "gentle", "vivid")
NOUNS = ("lamp", "kettle", "rake", "drum", "novel", "chisel", "puzzle", "teapot")


@dataclass(frozen=True)
class WorkloadResult:
    inserted: int
    updated: int
    deleted: int


def run_products(
    dsn: str,
    inserts: int = 200,
    updates: int = 80,
    deletes: int = 25,
    seed: int = 7,
    sku_prefix: str = "DEMO",
    progress: Callable[[str, int], None] | None = None,
) -> WorkloadResult:
    """Insert, then update prices and stock, then delete; each step its own transaction batch."""
    rng = random.Random(seed)
    ids: list[int] = []
    with psycopg.connect(dsn, autocommit=False) as conn, conn.cursor() as cur:
        for i in range(inserts):
            name = f"{rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}"
            cur.execute(
                "INSERT INTO products (sku, name, description, category, price_cents, stock, internal_notes)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (sku) DO UPDATE SET name = EXCLUDED.name RETURNING id",
                (
                    f"{sku_prefix}-{i:05d}", name, f"A {name} for every home.", rng.choice(CATEGORIES),
                    rng.randint(99, 99_999), rng.randint(0, 500), "supplier margin 12%",
                ),
            )
            row = cur.fetchone()
            assert row is not None
            ids.append(int(row[0]))
            if progress:
                progress("insert", 1)
        conn.commit()
        for product_id in rng.sample(ids, min(updates, len(ids))):
            cur.execute(
                "UPDATE products SET price_cents = %s, stock = stock + 1, updated_at = now() WHERE id = %s",
                (rng.randint(99, 99_999), product_id),
            )
            if progress:
                progress("update", 1)
        conn.commit()
        for product_id in rng.sample(ids, min(deletes, len(ids))):
            cur.execute("DELETE FROM products WHERE id = %s", (product_id,))
            if progress:
                progress("delete", 1)
        conn.commit()
    return WorkloadResult(len(ids), min(updates, len(ids)), min(deletes, len(ids)))


@dataclass(frozen=True)
class OrdersResult:
    orders: int
    payments: int
    refunds: int
    planted: tuple[str, ...]  # the finance exceptions written on purpose, by kind


def _money(rng: random.Random, low: int = 500, high: int = 50_000) -> Decimal:
    return (Decimal(rng.randint(low, high)) / 100).quantize(Decimal("0.01"))


def run_orders(
    dsn: str,
    orders: int = 40,
    seed: int = 11,
    progress: Callable[[str, int], None] | None = None,
) -> OrdersResult:
    """Orders with their captured payments and a few partial refunds, as a shop writes them, plus one of
    each finance exception the report looks for (README "Finance"): a payment that does not match its
    order, a payment for no order, a refund larger than its payment, a cancelled order still paid.

    Ids are new UUIDs each run, so running the demo again adds to what is there."""
    rng = random.Random(seed)
    payments = refunds = 0
    with psycopg.connect(dsn, autocommit=False) as conn, conn.cursor() as cur:

        def order(status: str, total: Decimal) -> uuid.UUID:
            oid = uuid.uuid4()
            items = [{"sku": f"DEMO-{rng.randint(0, 199):05d}", "qty": rng.randint(1, 3)}]
            cur.execute("INSERT INTO orders (id, user_id, status, total_amount, items) VALUES (%s, %s, %s, %s, %s)",
                        (oid, f"user-{rng.randint(1, 50)}", status, total, Jsonb(items)))
            return oid

        def payment(order_id: uuid.UUID, amount: Decimal) -> uuid.UUID:
            nonlocal payments
            pid = uuid.uuid4()
            cur.execute("INSERT INTO payments (id, order_id, amount, status, provider_ref) VALUES (%s, %s, %s, "
                        "'captured', %s)", (pid, order_id, amount, f"psp-{pid.hex[:12]}"))
            payments += 1
            return pid

        def refund(payment_id: uuid.UUID, order_id: uuid.UUID, amount: Decimal, reason: str) -> None:
            nonlocal refunds
            cur.execute("INSERT INTO refunds (id, payment_id, order_id, amount, reason) VALUES (%s, %s, %s, %s, %s)",
                        (uuid.uuid4(), payment_id, order_id, amount, reason))
            refunds += 1

        for _ in range(orders):
            total = _money(rng)
            oid = order("paid", total)
            pid = payment(oid, total)
            if rng.random() < 0.15:
                refund(pid, oid, (total / 4).quantize(Decimal("0.01")), "damaged item")
            if progress:
                progress("orders", 1)
        conn.commit()
        # One of each finance exception, on purpose.
        total = _money(rng)
        payment(order("paid", total), total - Decimal("1.00"))                           # payment_mismatch
        payment(uuid.uuid4(), _money(rng))                                                # orphan_payment
        total = _money(rng)
        oid = order("paid", total)
        refund(payment(oid, total), oid, total + Decimal("5.00"), "goodwill, too generous")  # refund_exceeds_payment
        total = _money(rng)
        payment(order("cancelled", total), total)                                         # cancelled_but_paid
        conn.commit()
        if progress:
            progress("exceptions", 4)
    planted = ("payment_mismatch", "orphan_payment", "refund_exceeds_payment", "cancelled_but_paid")
    return OrdersResult(orders + 3, payments, refunds, planted)


CITIES = ("New York", "Boston", "Chicago", "Denver")


@dataclass(frozen=True)
class UsersResult:
    users: dict[str, dict[str, Any]]  # id -> the document as it now stands
    events: int
    moved: str  # the user who moved to New York after their first change


def feed_users(bootstrap: str, topic: str, users: int = 50, seed: int = 11) -> UsersResult:
    """The user service's MongoDB, as Debezium's MongoDB connector writes its changes to ``topic``: one
    insert per user (``user-1`` .. ``user-N``, the ids the demo's orders carry), then one user moving to New
    York (an update with its full document and its updateDescription). The native stack has no MongoDB server;
    these are the records the connector writes (schemaless JsonConverter, Debezium 3.5's envelope), which the
    decode stage reads like any other. Under docker-compose the connector itself writes them."""
    rng = random.Random(seed)
    seconds = int(time.time())
    docs: dict[str, dict[str, Any]] = {}
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True})

    def send(op: str, doc: dict[str, Any], ordinal: int, updated: dict[str, Any] | None = None) -> None:
        source = {"version": "3.5.0.Final", "connector": "mongodb", "name": "users", "ts_ms": seconds * 1000,
                  "snapshot": "false", "db": "users", "sequence": None, "collection": "users", "ord": ordinal,
                  "lsid": None, "txnNumber": None, "wallTime": seconds * 1000}
        description = None if updated is None else {"removedFields": None, "truncatedArrays": None,
                                                      "updatedFields": orjson.dumps(updated).decode()}
        value = {"before": None, "after": orjson.dumps(doc).decode(), "updateDescription": description,
                 "source": source, "op": op, "ts_ms": seconds * 1000, "transaction": None}
        producer.produce(topic, key=orjson.dumps({"id": orjson.dumps(doc["_id"]).decode()}),
                         value=orjson.dumps(value))

    ordinal = 0
    for n in range(1, users + 1):
        uid = f"user-{n}"
        city = rng.choice(CITIES)
        doc = {"_id": uid, "email": f"{uid}@example.com", "name": f"User {n}", "status": "active",
               "profile": {"address": {"city": city, "zip": f"{rng.randint(10000, 99999)}"}}}
        ordinal += 1
        send("c", doc, ordinal)
        docs[uid] = doc
    moved = next(uid for uid, d in docs.items() if d["profile"]["address"]["city"] != "New York")
    docs[moved] = {**docs[moved], "profile": {"address": {"city": "New York", "zip": "10001"}}}
    ordinal += 1
    send("u", docs[moved], ordinal, {"profile.address": {"city": "New York", "zip": "10001"}})
    producer.flush(30)
    return UsersResult(docs, ordinal, moved)
