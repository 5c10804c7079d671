"""Erasure (#23) against the real stack: a person erased from every store, entity, view and topic, tracked to
confirmation, and kept erased through an update in flight, an interrupted request and its retry, a replay
from the earliest offsets, `dlq replay`, a late message, reconcile, a store and a view added afterwards, and
the same id registering again. Every check reads what a user would: the rows in each store.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import redis
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from psycopg import sql

from changeflow.deploy.secrets import erasure_token
from changeflow.pipelines.load import load
from changeflow.pipelines.spec import Pipeline
from changeflow.schemas.book import schema_book
from changeflow.settings import Settings
from changeflow.sinks import base
from changeflow.sinks.clickhouse import client_for
from changeflow.sinks.redis import row_key
from changeflow.sinks.runner import replay_into_store
from changeflow.streams.canonical import to_avro
from changeflow.streams.records import ChangeRecord
from tests.integration.conftest import eventually, redis_url, search_url, stop_process
from tests.integration.test_own_database import _answers, _drop_everything, changeflow

pytestmark = pytest.mark.integration

PORT = 6191

PIPELINE = """\
name: {name}
sources:
  postgres:
    database: {database}
entities:
  users:
    table: public.users
    stores: {users_stores}
  orders:
    table: public.orders
    stores:
      postgres: {{database: {read_db}}}
  payments:
    table: public.payments
  reviews:
    table: public.reviews
views:
  ny_orders:
    from: orders
    join:
      user: {{entity: users, on: user_id}}
    fields:
      total: total
      user_name: user.name
      email: user.email
      city: user.city
    filter: "city == 'New York'"
  order_buyers:
    from: orders
    join:
      buyer: {{entity: users, on: user_id}}
    fields: {{total: total, user_id: user_id, ship_to: ship_to, buyer: buyer.name}}
{extra_view}
erasure:
  subjects:
    user:
      entity: users
      refers:
        orders: {{column: user_id, action: anonymise, clear: [ship_to]}}
        payments: {{column: order_id, through: orders, action: delete}}
        reviews: {{column: user_id, action: delete}}
      external:
        billing: {{description: "the billing service's invoices"}}
"""

EMAILS_VIEW = """\
  user_emails:
    from: users
    fields: {email: email, name: name}
"""

STORES = ("redis", "search", "clickhouse")


class Erasure:
    def __init__(self, settings: Settings, tmp: Path) -> None:
        self.settings = settings
        self.tmp = tmp
        tag = uuid.uuid4().hex[:8]
        self.name, self.database, self.read_db = f"erase_{tag}", f"cf_erase_{tag}", f"cf_erase_{tag}_read"
        self.file = tmp / "pipeline.yml"
        self.worker: subprocess.Popen[Any] | None = None
        self.totals = {"2": "3.00", "4": "6.00", "6": "9.00"}  # Ann's orders' totals, as the source has them

    def write_file(self, *, users_in_postgres: bool = False, emails_view: bool = False) -> None:
        users_stores = f"{{postgres: {{database: {self.read_db}}}}}" if users_in_postgres else "{}"
        self.file.write_text(PIPELINE.format(name=self.name, database=self.database, read_db=self.read_db,
                                             users_stores=users_stores, extra_view=EMAILS_VIEW if emails_view else ""))

    @property
    def pipeline(self) -> Pipeline:
        return load(self.file)

    @property
    def dsn(self) -> str:
        return psycopg.conninfo.make_conninfo(self.settings.pg_dsn, dbname=self.database)

    def sql(self, statement: str, *params: Any) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(statement, params or None)  # type: ignore[arg-type]

    def start_worker(self) -> None:
        env = {**os.environ, "CHANGEFLOW_WORKER_WEB_PORT": str(PORT), "PYTHONUNBUFFERED": "1"}
        log = (self.tmp / "worker.log").open("a")
        self.worker = subprocess.Popen(
            [sys.executable, "-m", "changeflow", "--pipeline", str(self.file), "worker"], cwd=self.tmp, env=env,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        eventually(lambda: self.worker is not None and self.worker.poll() is None and _answers(PORT), timeout=120,
                   what="worker up")

    def stop_worker(self) -> None:
        if self.worker is not None:
            assert stop_process(self.worker) == 0
            self.worker = None

    # --- what each store holds, read as a user would -----------------------------------------------------
    def rows(self, store: str, entity: str, keys: list[str]) -> dict[str, dict[str, Any]]:
        pipeline = self.pipeline
        s = base.create(store, self.settings, pipeline)
        try:
            return {k: v.row for k, v in s.fetch(pipeline.entities[entity], keys).items()}
        finally:
            s.close()

    def traces(self, store: str, entity: str, keys: list[str]) -> int:
        pipeline = self.pipeline
        s = base.create(store, self.settings, pipeline)
        try:
            return s.traces(pipeline.entities[entity], keys)
        finally:
            s.close()

    def clickhouse_everything(self, entity: str, key: str) -> dict[str, int]:
        """Every row ClickHouse holds of the key, without FINAL: the entity's table (tombstones included), the
        changelog and reconcile's differing keys."""
        ch = client_for(self.settings)
        try:
            p = {"k": key, "e": entity}
            return {
                "table": int(ch.command(f"SELECT count() FROM `{self.name}`.`{entity}` WHERE _key = {{k:String}}",
                                        parameters=p)),
                "changelog": int(ch.command(f"SELECT count() FROM `{self.name}`.changelog WHERE entity = {{e:String}} "
                                            "AND key = {k:String}", parameters=p)),
                "diffs": int(ch.command(f"SELECT count() FROM `{self.name}`.reconciliation_diffs "
                                        "WHERE entity = {e:String} AND key = {k:String}", parameters=p)),
            }
        finally:
            ch.close()

    def redis_version_held(self, entity: str, key: str) -> bool:
        """The row's key, or its field in the versions hash (a remembered delete)."""
        rds = redis.Redis.from_url(redis_url(self.settings))
        held = row_key(self.pipeline.entities[entity], key)
        return rds.hexists(f"{self.name}:versions", held) or rds.exists(held) > 0

    def search_holds(self, entity: str, key: str) -> bool:
        index = f"{self.name}-{entity}"
        httpx.post(f"{search_url(self.settings)}/{index}/_refresh", timeout=30)
        r = httpx.post(f"{search_url(self.settings)}/{index}/_search",
                       json={"query": {"ids": {"values": [key]}}}, timeout=30)
        return r.status_code == 200 and r.json()["hits"]["total"]["value"] > 0

    def status(self, request: str | None = None) -> list[dict[str, Any]]:
        result = changeflow(self.file, "erasure", "status", *([request] if request else []), "--json")
        assert result.returncode == 0, result.stdout + result.stderr
        return json.loads(result.stdout)  # type: ignore[no-any-return]


def states(request: dict[str, Any]) -> dict[str, str]:
    return {p["name"]: p["state"] for p in request["projections"]}


@pytest.fixture
def erasure(live_stack: Settings, tmp_path: Path) -> Iterator[Erasure]:
    e = Erasure(live_stack, tmp_path)
    with psycopg.connect(live_stack.pg_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(e.database)))
    try:
        e.sql("CREATE TABLE users (id integer PRIMARY KEY, name text, email text, city text)")
        e.sql("CREATE TABLE orders (id integer PRIMARY KEY, user_id integer NOT NULL, total numeric(12,2), "
              "ship_to text)")
        e.sql("CREATE TABLE payments (id integer PRIMARY KEY, order_id integer NOT NULL, card text)")
        e.sql("CREATE TABLE reviews (id integer PRIMARY KEY, user_id integer NOT NULL, body text)")
        e.sql("INSERT INTO users VALUES (1, 'Ann', 'ann@example.com', 'New York'), "
              "(2, 'Bob', 'bob@example.com', 'New York')")
        e.sql("INSERT INTO orders SELECT g, 1 + g % 2, g * 1.50, 'Street ' || g FROM generate_series(1, 6) g")
        e.sql("INSERT INTO payments SELECT 100 + g, g, '4111-' || g FROM generate_series(1, 6) g")
        e.sql("INSERT INTO reviews VALUES (1, 1, 'by Ann'), (2, 2, 'by Bob')")
        e.write_file()
        result = changeflow(e.file, "pipeline", "check")
        assert result.returncode == 0, result.stdout + result.stderr
        result = changeflow(e.file, "connectors", "apply", "--timeout", "150")
        assert result.returncode == 0, result.stdout + result.stderr
        yield e
    finally:
        if e.worker is not None:
            stop_process(e.worker)
        _drop_everything(live_stack, e.database, e.name)
        with psycopg.connect(live_stack.pg_dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(e.read_db)))


ANN_ORDERS = ["2", "4", "6"]  # user_id = 1 + id % 2
ANN_PAYMENTS = ["102", "104", "106"]


def ann_is_gone(e: Erasure) -> bool:
    """Nothing of Ann in any store: her row and reviews gone, her orders anonymised (kept, totals exact), the
    payments of those orders gone, and no New York order of hers in the view."""
    for store in STORES:
        assert e.rows(store, "users", ["1"]) == {}, store
        assert e.rows(store, "reviews", ["1"]) == {}, store
        assert e.rows(store, "payments", ANN_PAYMENTS) == {}, store
        assert sorted(e.rows(store, "ny_orders", [*ANN_ORDERS, "1", "3", "5"])) == ["1", "3", "5"], store
        orders = e.rows(store, "orders", ANN_ORDERS)
        assert {k: (r["user_id"], r["ship_to"], str(r["total"])) for k, r in orders.items()} == {
            k: (None, None, total) for k, total in e.totals.items()}, store
        # A view with a row per order keeps the order, its link and Ann's fields cleared.
        bought = e.rows(store, "order_buyers", ANN_ORDERS)
        assert {k: (r["user_id"], r["ship_to"], r["buyer"], str(r["total"])) for k, r in bought.items()} == {
            k: (None, None, None, total) for k, total in e.totals.items()}, store
    pg_orders = e.rows("postgres", "orders", ANN_ORDERS)
    assert {k: (r["user_id"], r["ship_to"]) for k, r in pg_orders.items()} == {
        "2": (None, None), "4": (None, None), "6": (None, None)}
    return True


def bob_is_whole(e: Erasure) -> bool:
    for store in STORES:
        assert e.rows(store, "users", ["2"])["2"]["email"] == "bob@example.com", store
        assert e.rows(store, "orders", ["3"])["3"]["ship_to"] == "Street 3", store
        assert sorted(e.rows(store, "payments", ["101", "103", "105"])) == ["101", "103", "105"], store
    return True


def test_a_person_is_erased_everywhere_and_stays_erased(erasure: Erasure) -> None:
    e = erasure
    e.start_worker()
    eventually(lambda: all(e.rows(s, "ny_orders", ["2"]) for s in STORES) and e.rows("postgres", "orders", ["6"])
               and all(e.rows(s, "reviews", ["1"]) for s in STORES), timeout=120, what="the snapshot everywhere")
    # A past drift of Ann's row, recorded by reconcile (its differing keys are one of the copies to erase).
    e.stop_worker()
    e.sql("UPDATE users SET email = 'ann@elsewhere.example' WHERE id = 1")
    drift = changeflow(e.file, "reconcile", "--entity", "users", "--full", "--format", "json")
    assert drift.returncode == 1, drift.stdout + drift.stderr
    assert e.clickhouse_everything("users", "1")["diffs"] >= 1

    # The source first: the user service deletes Ann (after one more update, both still in flight: the worker
    # is down). Orders, payments and reviews stay at the source, kept by their services.
    e.sql("UPDATE users SET name = 'Ann in flight' WHERE id = 1")
    e.sql("DELETE FROM users WHERE id = 1")

    # Interrupted: nothing applies the erasure while the worker is down; the request stays open.
    first = changeflow(e.file, "erase", "user", "1", "--timeout", "5")
    assert first.returncode == 1
    assert "not applied after 5s" in first.stderr and "run the same erasure again" in first.stderr, first.stderr
    [opened] = e.status()
    assert opened["state"] == "open" and states(opened)["source/users"] == "erased"

    # The retry resumes the same request and finishes every projection but the external one.
    e.start_worker()
    second = changeflow(e.file, "erase", "user", "1", "--json")
    assert second.returncode == 0, second.stdout + second.stderr
    request = json.loads(second.stdout)
    assert request["request"] == opened["request"]
    got = states(request)
    assert got.pop("external/billing") == "pending"
    assert set(got.values()) <= {"erased", "purged"}, got
    for store in (*STORES, "postgres"):
        for entity in ("users", "orders", "payments", "reviews"):
            if store != "postgres" or entity == "orders":
                assert f"{store}/{entity}" in got, (store, entity)
    assert {"redis/ny_orders", "search/ny_orders", "clickhouse/ny_orders"} <= set(got)
    assert request["state"] == "open"
    eventually(lambda: ann_is_gone(e), timeout=30, what="Ann gone from every store")
    assert bob_is_whole(e)
    assert e.clickhouse_everything("users", "1") == {"table": 0, "changelog": 0, "diffs": 0}
    for key in ANN_PAYMENTS:
        assert e.clickhouse_everything("payments", key) == {"table": 0, "changelog": 0, "diffs": 0}
    assert not e.redis_version_held("users", "1")
    assert not e.search_holds("users", "1")
    for store in STORES:
        assert e.traces(store, "users", ["1"]) == 0, store
    # The request keeps a mark, never Ann's id or values.
    ch = client_for(e.settings)
    try:
        rows = ch.query(f"SELECT * FROM `{e.name}`.erasure_requests").result_rows
    finally:
        ch.close()
    assert rows and not any("ann" in str(r).lower() for r in rows)

    # The endpoint deletes data: without the token, 401 and nothing changes; with it, the confirmation closes it.
    url = f"http://127.0.0.1:{PORT}/changeflow/erasure/"
    body = {"action": "confirm", "request": request["request"], "projection": "billing"}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": erasure_token(e.settings)}):
        refused = httpx.post(url, json=body, headers=headers, timeout=30)
        assert refused.status_code == 401, refused.text
    assert states(e.status(request["request"])[0])["external/billing"] == "pending"
    token = {"Authorization": f"Bearer {erasure_token(e.settings)}"}
    bad = httpx.post(url, content=b"{not json", headers={**token, "Content-Type": "application/json"}, timeout=30)
    assert (bad.status_code, bad.json()) == (400, {"error": "the body is not JSON"})
    unknown = httpx.post(url, json={**body, "projection": "crm"}, headers=token, timeout=30)
    assert unknown.status_code == 409 and "its external projections: billing" in unknown.json()["error"]
    confirmed = httpx.post(url, json=body, headers=token, timeout=30)
    assert confirmed.status_code == 200, confirmed.text
    assert confirmed.json()["state"] == "closed"
    assert e.status(request["request"])[0]["state"] == "closed"

    # Nothing brings Ann back.
    pipeline = e.pipeline
    book = schema_book(e.settings, pipeline, writer=False)
    # 1. A dead letter replayed into a store: her first canonical record, still on the topic until compaction.
    old = _first_record(e.settings, pipeline.entities["users"].canonical_topic, b"users:1")
    assert old is not None
    for store in STORES:
        [outcome] = replay_into_store(e.settings, pipeline, store, [old])
        assert (outcome.outcome, outcome.key) == ("suppressed", "(erased)")
    # 2. A late message, older than the request, with a version above anything ever written: what a search write
    #    arriving after `index.gc_deletes` is (the engine no longer remembers the delete; nothing in a store
    #    would refuse it). Only the suppression list stops it.
    late = ChangeRecord("postgres", "users", "1", "u", 10**15, int(time.time() * 1000) - 3_600_000, None,
                        {"id": 1, "name": "Ann late", "email": "ann@example.com", "city": "New York"},
                        key_columns=("id",), types=book.latest["users"].columns)
    store = base.create("clickhouse", e.settings, pipeline)
    try:
        held = store.fetch(pipeline.entities["orders"], ["2"])["2"].version or 0
    finally:
        store.close()
    late_order = ChangeRecord("postgres", "orders", "2", "u", held + 1, int(time.time() * 1000) - 3_600_000, None,
                              {"id": 2, "user_id": 1, "total": Decimal("3.00"), "ship_to": "Street 2"},
                              key_columns=("id",), types=book.latest["orders"].columns)
    producer = Producer({"bootstrap.servers": e.settings.kafka_bootstrap})
    for r in (late, late_order):
        producer.produce(pipeline.entities[r.entity].canonical_topic, key=r.kafka_key.encode(),
                         value=to_avro(book, r))
    assert producer.flush(30) == 0
    # 3. An order updated at the source, where it keeps its link: anonymised on every change.
    e.sql("UPDATE orders SET total = 7.77 WHERE id = 4")
    e.totals["4"] = "7.77"
    # The view stage is a process of its own: its row follows the entity's a little later.
    eventually(lambda: all(str(e.rows(s, entity, ["4"])["4"]["total"]) == "7.77"
                           for s in STORES for entity in ("orders", "order_buyers")),
               timeout=60, what="order 4's new total")
    assert all(e.rows(s, "orders", ["4"])["4"]["user_id"] is None for s in STORES)
    assert ann_is_gone(e)
    # 3b. A repair: Redis loses order 2, `reconcile --repair` re-reads it from the source (still linked there),
    #     and it lands anonymised. A rebuild of the search index (a new index behind the alias, filled by a
    #     snapshot of the source) brings no link back either.
    redis.Redis.from_url(redis_url(e.settings)).delete(row_key(pipeline.entities["orders"], "2"))
    repaired = changeflow(e.file, "reconcile", "--entity", "orders", "--store", "redis", "--repair",
                          "--timeout", "120", "--format", "json")
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    eventually(lambda: e.rows("redis", "orders", ["2"]), timeout=60, what="order 2 repaired")
    rebuilt = changeflow(e.file, "rebuild", "search", "--entity", "orders", "--timeout", "180")
    assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
    assert ann_is_gone(e)
    # 4. reconcile finds no drift (the erased rows are compared as the stream writes them), and records none.
    clean = changeflow(e.file, "reconcile", "--full", "--format", "json")
    report = json.loads(clean.stdout)
    assert clean.returncode == 0, [(r["store"], r["entity"], r["diffs"][:3]) for r in report["results"] if r["drift"]]
    # 5. A replay of everything from the earliest offsets (every consumer group of the pipeline forgotten), a
    #    store added to users (PostgreSQL) and a view added afterwards (user_emails): both filled from the topics.
    e.stop_worker()
    admin = AdminClient({"bootstrap.servers": e.settings.kafka_bootstrap})
    groups = [g.group_id for g in admin.list_consumer_groups().result(timeout=30).valid
              if g.group_id.startswith(e.name)]
    assert groups
    for future in admin.delete_consumer_groups(groups).values():
        future.result(timeout=30)
    e.write_file(users_in_postgres=True, emails_view=True)
    e.sql("INSERT INTO users VALUES (3, 'Cy', 'cy@example.com', 'Boston')")  # the replay's last record
    e.start_worker()
    eventually(lambda: e.rows("postgres", "users", ["3"]) and all(e.rows(s, "user_emails", ["3"]) for s in STORES),
               timeout=180, what="the replay and the new store and view")
    time.sleep(3)
    assert ann_is_gone(e) and bob_is_whole(e)
    # The replay brought no trace of Ann's keys back either: not her row, not even a tombstone of it (the
    # source's delete and the erasure's own are on the topic until compaction; both are judged).
    for store in STORES:
        assert e.traces(store, "users", ["1"]) == 0, store
        assert e.traces(store, "payments", ANN_PAYMENTS) == 0, store
    assert e.clickhouse_everything("users", "1") == {"table": 0, "changelog": 0, "diffs": 0}
    assert e.rows("postgres", "users", ["1", "2"]).keys() == {"2"}
    for store in STORES:
        assert sorted(e.rows(store, "user_emails", ["1", "2", "3"])) == ["2", "3"], store

    # The same id registers again: new data flows, old data does not come back.
    e.sql("INSERT INTO users VALUES (1, 'Ann Two', 'two@example.com', 'New York')")
    e.sql("INSERT INTO orders VALUES (50, 1, 5.00, 'New Street')")
    eventually(lambda: all(e.rows(s, "ny_orders", ["50"]) and e.rows(s, "order_buyers", ["50"]) for s in STORES),
               timeout=60, what="the new Ann's order")
    for store in STORES:
        assert e.rows(store, "users", ["1"])["1"]["email"] == "two@example.com", store
        assert e.rows(store, "ny_orders", ["50"])["50"]["email"] == "two@example.com", store
        assert e.rows(store, "orders", ["50"])["50"]["ship_to"] == "New Street", store
        assert sorted(e.rows(store, "ny_orders", [*ANN_ORDERS, "50"])) == ["50"], store
        assert {k: r["user_id"] for k, r in e.rows(store, "orders", ANN_ORDERS).items()} == {
            "2": None, "4": None, "6": None}, store
        assert e.rows(store, "order_buyers", ["50"])["50"]["buyer"] == "Ann Two", store
        assert {k: r["buyer"] for k, r in e.rows(store, "order_buyers", ANN_ORDERS).items()} == {
            "2": None, "4": None, "6": None}, store
    # Reconcile computes the views at the source as the stream does: Ann's old orders, still linked to id 1
    # there, are not Ann Two's orders (their link was cut), so neither view differs.
    again = changeflow(e.file, "reconcile", "--full", "--format", "json")
    report = json.loads(again.stdout)
    assert again.returncode == 0, [(r["store"], r["entity"], r["diffs"][:3]) for r in report["results"] if r["drift"]]
    assert {r["entity"] for r in report["results"]} >= {"ny_orders", "order_buyers"}


def _first_record(settings: Settings, topic: str, key: bytes) -> tuple[bytes, tuple[str, int, int]] | None:
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": f"t-{uuid.uuid4().hex}",
                         "enable.partition.eof": True})
    try:
        meta = consumer.list_topics(topic, timeout=10).topics[topic]
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions])
        ends = len(meta.partitions)
        deadline = time.monotonic() + 30
        while ends and time.monotonic() < deadline:
            msg = consumer.poll(1.0)
            if msg is None:
                continue
            if msg.error() is not None:
                ends -= 1
                continue
            if msg.key() == key and msg.value() is not None:
                return msg.value(), (msg.topic(), msg.partition(), msg.offset())  # type: ignore[return-value]
        return None
    finally:
        consumer.close()


def test_erase_refuses_while_the_source_holds_the_person_and_names_the_fix(erasure: Erasure) -> None:
    e = erasure
    result = changeflow(e.file, "erase", "user", "2")
    assert result.returncode == 1
    assert "the source still holds the person: public.users has their row" in result.stderr, result.stderr
    assert "--wait-source" in result.stderr
    unknown = changeflow(e.file, "erase", "customer", "2")
    assert unknown.returncode == 1 and "unknown erasure subject 'customer'; the pipeline declares: user" in \
        unknown.stderr
    [request] = e.status()
    assert request["state"] == "open" and states(request)["source/users"] == "pending"
    # Nothing was removed: Bob is still at the source, and the stores were never touched.
    with psycopg.connect(e.dsn) as conn:
        assert conn.execute("SELECT email FROM users WHERE id = 2").fetchone() == ("bob@example.com",)
