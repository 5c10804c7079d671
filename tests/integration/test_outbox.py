"""The outbox pattern end to end on the real stack (README "Outbox and events").

A database of the test's own holds the example's orders and the seed's ``outbox_messages``; the example
pipeline (examples/outbox/pipeline.yml, renamed) is applied with ``connectors apply``, so Debezium's outbox
router publishes each event; the example consumer applies them through its inbox in a second database.
Everything created is removed at the end.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from confluent_kafka import Consumer, TopicPartition
from psycopg import sql

from changeflow.connectors.client import KafkaConnectClient
from changeflow.outbox.events import BadEvent, Event, from_message
from changeflow.pipelines.load import load
from changeflow.pipelines.outbox import specs
from changeflow.pipelines.spec import Pipeline
from changeflow.settings import Settings
from tests.integration.conftest import eventually
from tests.integration.test_own_database import _drop_everything

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "outbox"


@dataclass
class Shop:
    pipeline: Pipeline
    file: Path
    dsn: str  # the source database
    consumer_dsn: str  # the consumer service's own database
    settings: Settings

    @property
    def events_topic(self) -> str:
        return f"{self.pipeline.namespace}.events.order"

    @property
    def dlq_topic(self) -> str:
        return specs(self.pipeline)[0].dlq_topic

    def place(self, order_id: int, customer: str = "ada", total: int = 1250, aggregate_type: str = "order",
              aggregate_id: str | None = None, payload: Any = "default", commit: bool = True) -> str:
        """An order and its event, written in one transaction (rolled back when not ``commit``); the event id."""
        event_id = str(uuid.uuid4())
        body = {"customer": customer, "total_cents": total, "order_id": order_id} if payload == "default" else payload
        with psycopg.connect(self.dsn) as conn:
            conn.execute("INSERT INTO public.orders (id, customer, total_cents) VALUES (%s, %s, %s)",
                         (order_id, customer, total))
            conn.execute("INSERT INTO public.outbox_messages (id, aggregate_type, aggregate_id, event_type, payload, "
                         "trace_id) VALUES (%s, %s, %s, 'order_placed', %s, 'trace-1')",
                         (event_id, aggregate_type, aggregate_id or str(order_id),
                          None if body is None else json.dumps(body)))
            if not commit:
                conn.rollback()
        return event_id


def changeflow(file: Path | None, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    chosen = ["--pipeline", str(file)] if file is not None else []
    return subprocess.run([sys.executable, "-m", "changeflow", *chosen, *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def read_topic(settings: Settings, topic: str, count: int, timeout: float = 60) -> list[Any]:
    """The first ``count`` messages of a topic (every partition, from the beginning), nothing committed."""
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": f"t-{uuid.uuid4().hex}",
                         "enable.auto.commit": False, "auto.offset.reset": "earliest"})
    out: list[Any] = []
    try:
        def assigned() -> list[TopicPartition]:
            meta = consumer.list_topics(topic, timeout=10).topics[topic]
            assert meta.error is None and meta.partitions, f"topic {topic} not there yet"
            return [TopicPartition(topic, p, 0) for p in meta.partitions]
        consumer.assign(eventually(assigned, timeout=timeout, what=f"topic {topic}"))
        deadline = time.monotonic() + timeout
        while len(out) < count and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is not None and message.error() is None:
                out.append(message)
    finally:
        consumer.close()
    assert len(out) >= count, f"{len(out)} of {count} messages on {topic}"
    return out


def events(settings: Settings, topic: str, count: int) -> list[Event]:
    return sorted((from_message(m) for m in read_topic(settings, topic, count)), key=lambda e: e.offset)


@pytest.fixture
def shop(live_stack: Settings, tmp_path: Path) -> Iterator[Shop]:
    settings = live_stack
    tag = uuid.uuid4().hex[:8]
    database, name = f"cf_ob_{tag}", f"ob_{tag}"
    consumer_db = f"{name}_read"  # dropped with the own database's helpers
    with psycopg.connect(settings.pg_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(consumer_db)))
    dsn = psycopg.conninfo.make_conninfo(settings.pg_dsn, dbname=database)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute((EXAMPLE / "schema.sql").read_text())
        doc = yaml.safe_load((EXAMPLE / "pipeline.yml").read_text())
        doc["name"] = name
        doc["sources"]["postgres"]["database"] = database
        file = tmp_path / "pipeline.yml"
        file.write_text(yaml.safe_dump(doc))
        result = changeflow(file, "pipeline", "check")
        assert result.returncode == 0, result.stdout + result.stderr
        result = changeflow(file, "connectors", "apply")
        assert result.returncode == 0, result.stdout + result.stderr
        yield Shop(load(file), file, dsn, psycopg.conninfo.make_conninfo(settings.pg_dsn, dbname=consumer_db),
                   settings)
    finally:
        _drop_everything(settings, database, name)


def task_states(settings: Settings, name: str) -> list[str]:
    client = KafkaConnectClient(settings.connect_url)
    try:
        return [t["state"] for t in client.status(name)["tasks"]]
    finally:
        client.close()


def test_an_order_and_its_event_written_in_one_transaction_reach_the_routed_topic(shop: Shop) -> None:
    event_id = shop.place(1001, customer="ada", total=1250)
    with psycopg.connect(shop.dsn) as conn:
        row = conn.execute("SELECT occurred_at FROM public.outbox_messages WHERE id = %s", (event_id,)).fetchone()
    assert row is not None
    # The record's timestamp is the row's `timestamp` column (columns.timestamp), in milliseconds (UTC).
    occurred = row[0].replace(tzinfo=UTC)
    [message] = read_topic(shop.settings, shop.events_topic, 1)
    assert message.timestamp()[1] == int(occurred.timestamp() * 1_000_000) // 1000
    [event] = events(shop.settings, shop.events_topic, 1)
    assert event.id == event_id
    assert event.aggregate_id == "1001"
    assert event.aggregate_type == "order"
    assert event.type == "order_placed"
    assert event.payload == {"customer": "ada", "total_cents": 1250, "order_id": 1001}
    assert event.headers["trace_id"] == "trace-1"
    assert {k for k in event.headers if not k.startswith("__debezium")} == {
        "id", "aggregate_type", "type", "trace_id", "created_at"}
    assert event.headers["created_at"].endswith("Z")  # timestamptz as Debezium's ZonedTimestamp text


HOSTILE_TYPES = {
    "spaces": "order line",
    "long": "o" * 300,
    "non-ASCII": "commande_é",
    "newline": "order\nline",
    "empty": "",
}


def test_an_aggregate_type_that_is_no_topic_name_is_a_dead_letter_and_the_task_stays_running(shop: Shop) -> None:
    ids = {case: shop.place(2000 + i, aggregate_type=t) for i, (case, t) in enumerate(HOSTILE_TYPES.items())}
    dotted = shop.place(2100, aggregate_type="..")  # legal after the prefix: <ns>.events...
    after = shop.place(2101)  # the connector goes on after all of them
    dead = {e.id: e for e in events(shop.settings, shop.dlq_topic, len(HOSTILE_TYPES))}
    assert set(dead) == set(ids.values())
    spec = specs(shop.pipeline)[0]
    for case, aggregate_type in HOSTILE_TYPES.items():
        event = dead[ids[case]]
        assert event.aggregate_type == aggregate_type, case
        assert event.headers["changeflow.error"] == (
            f"the aggregate type is not a legal topic name part (1 to {spec.longest_type} characters of "
            "A-Za-z0-9._-); the event is kept here, its type in the aggregate_type header")
        assert event.payload["order_id"] == 2000 + list(HOSTILE_TYPES).index(case)
    [legal] = events(shop.settings, f"{shop.pipeline.namespace}.events...", 1)
    assert legal.id == dotted
    [ok] = events(shop.settings, shop.events_topic, 1)
    assert ok.id == after
    assert_running(shop)
    # `connectors delete --purge` removes the outbox's topics with the rest (routed ones found by prefix).
    purged = changeflow(shop.file, "connectors", "delete", "--yes", "--purge")
    assert purged.returncode == 0, purged.stdout + purged.stderr
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": shop.settings.kafka_bootstrap})
    eventually(lambda: not [t for t in admin.list_topics(timeout=10).topics
                            if t.startswith(f"{shop.pipeline.namespace}.")], what="the pipeline's topics gone")
    # ... and what prepare added to the outbox table: the table is the user's again.
    with psycopg.connect(shop.dsn) as conn:
        assert conn.execute("SELECT tgname FROM pg_trigger WHERE tgrelid = 'public.outbox_messages'::regclass "
                            "AND NOT tgisinternal").fetchall() == []
        assert conn.execute("SELECT conname FROM pg_constraint WHERE conrelid = 'public.outbox_messages'::regclass "
                            "AND contype = 'c'").fetchall() == []


def run_consumer(shop: Shop, group: str) -> str:
    """The example consumer as a program, until 4 s without a message; its closing counts line."""
    result = subprocess.run([sys.executable, "-m", "examples.outbox.consumer", "--dsn", shop.consumer_dsn, "--topic",
                             shop.events_topic, "--group", group, "--idle", "4"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def totals(shop: Shop) -> dict[str, tuple[int, int]]:
    with psycopg.connect(shop.consumer_dsn) as conn:
        rows = conn.execute("SELECT customer, total_cents, orders FROM public.customer_totals").fetchall()
    return {c: (t, n) for c, t, n in rows}


def connector(shop: Shop, method: str, path: str) -> None:
    import httpx

    name = shop.pipeline.connector_name("postgres")
    response = httpx.request(method, f"{shop.settings.connect_url}/connectors/{name}{path}", timeout=30)
    assert response.status_code < 300, response.text


def assert_running(shop: Shop) -> None:
    """The task never failed: RUNNING (a Connect rebalance, another pipeline's connector being registered on
    the shared worker, may restart it for a moment, so RUNNING is waited for; FAILED never turns back)."""
    states = task_states(shop.settings, shop.pipeline.connector_name("postgres"))
    assert "FAILED" not in states, states
    wait_running(shop)


def wait_running(shop: Shop) -> None:
    eventually(lambda: task_states(shop.settings, shop.pipeline.connector_name("postgres")) == ["RUNNING"],
               timeout=120, what="connector task RUNNING")


def test_the_example_consumer_applies_each_event_once_across_replays_a_restart_and_a_resnapshot(shop: Shop) -> None:
    first = [shop.place(1, "ada", 1000), shop.place(2, "ada", 500), shop.place(3, "bob", 700)]
    assert sorted(e.id for e in events(shop.settings, shop.events_topic, 3)) == sorted(first)
    assert run_consumer(shop, "billing") == "applied=3 duplicates=0 bad=0"
    assert totals(shop) == {"ada": (1500, 2), "bob": (700, 1)}
    assert run_consumer(shop, "billing") == "applied=0 duplicates=0 bad=0"  # redelivery: nothing new
    # An offset rewind: a group reading from offset 0 sees every event again and applies none.
    assert run_consumer(shop, "billing-rewound") == "applied=0 duplicates=3 bad=0"
    # A re-snapshot of the outbox table re-emits every retained row (op r) with the same event ids.
    signal = sql.Identifier(*shop.pipeline.signal_table.split("."))
    with psycopg.connect(shop.dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("INSERT INTO {} (id, type, data) VALUES (%s, 'execute-snapshot', %s)").format(signal),
                     (str(uuid.uuid4()), json.dumps({"data-collections": ["public.outbox_messages"],
                                                     "type": "incremental"})))
    again = events(shop.settings, shop.events_topic, 6)
    assert sorted(e.id for e in again) == sorted(first * 2)
    assert run_consumer(shop, "billing") == "applied=0 duplicates=3 bad=0"
    # A connector restart, then a new order: applied once.
    connector(shop, "POST", "/restart?includeTasks=true")
    wait_running(shop)
    shop.place(4, "bob", 300)
    events(shop.settings, shop.events_topic, 7)
    assert run_consumer(shop, "billing") == "applied=1 duplicates=0 bad=0"
    assert totals(shop) == {"ada": (1500, 2), "bob": (1000, 2)}
    with psycopg.connect(shop.consumer_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM public.inbox").fetchone() == (4,)


def test_hostile_rows_rollbacks_updates_deletes_null_payloads_and_odd_keys(shop: Shop) -> None:
    shop.place(10, commit=False)  # rolled back: nothing emitted
    odd = 'A-"1"\\ \n\'x'
    odd_id = shop.place(11, aggregate_id=odd)
    null_id = shop.place(12, payload=None)
    with psycopg.connect(shop.dsn, autocommit=True) as conn:
        conn.execute("UPDATE public.outbox_messages SET event_type = 'changed' WHERE id = %s", (odd_id,))
        conn.execute("DELETE FROM public.outbox_messages WHERE id = %s", (null_id,))
    with pytest.raises(psycopg.errors.CheckViolation, match="changeflow_orders_payload_size"):
        shop.place(14, payload={"blob": "x" * 300_000})  # larger than a Kafka message takes: refused, order too
    last = shop.place(13)
    got = {e.id: e for e in events(shop.settings, shop.events_topic, 3)}
    assert set(got) == {odd_id, null_id, last}  # no rolled-back, updated or deleted row became one
    # The UPDATE is a dead letter with its reason, naming the row (prepare's trigger, the connector's router).
    [dead] = read_topic(shop.settings, shop.dlq_topic, 1)
    headers = dict(dead.headers())
    assert headers["changeflow.error"].decode() == (
        "an UPDATE of an outbox row: Debezium's router publishes a row once, when it is inserted, and drops its "
        "updates; insert a new event instead")
    with pytest.raises(BadEvent) as bad:
        from_message(dead)
    assert str(bad.value).endswith(f'(outbox orders, row id "{odd_id}")')
    assert got[odd_id].aggregate_id == odd
    assert (got[null_id].payload, got[null_id].type) == (None, "order_placed")
    assert_running(shop)
    tail = changeflow(shop.file, "events", "tail", "--from-beginning", "--limit", "4", "--idle", "30")
    assert tail.returncode == 0, tail.stderr
    [update] = [line for line in tail.stdout.splitlines() if line.startswith("not an event: ")]
    assert update.endswith(f'insert a new event instead (outbox orders, row id "{odd_id}")')
    lines = {line.split(" id=")[1].split(" ")[0]: line for line in tail.stdout.splitlines() if " id=" in line}
    assert len(lines) == 3
    assert 'aggregate="order"/"A-\\"1\\"\\\\ \\n\'x" type="order_placed"' in lines[f'"{odd_id}"']
    assert lines[f'"{null_id}"'].endswith(" payload=null")


def outbox_count(shop: Shop) -> int:
    with psycopg.connect(shop.dsn) as conn:
        row = conn.execute("SELECT count(*) FROM public.outbox_messages").fetchone()
    assert row is not None
    return int(row[0])


def test_prune_deletes_captured_rows_and_never_one_the_slot_has_not_confirmed(shop: Shop) -> None:
    # The default: the writer deletes its row in the transaction that inserted it; the event still goes out.
    gone = str(uuid.uuid4())
    with psycopg.connect(shop.dsn) as conn:
        conn.execute("INSERT INTO public.outbox_messages (id, aggregate_type, aggregate_id, event_type, payload) "
                     "VALUES (%s, 'order', '19', 'order_placed', '{}')", (gone,))
        conn.execute("DELETE FROM public.outbox_messages WHERE id = %s", (gone,))
    assert [e.id for e in events(shop.settings, shop.events_topic, 1)] == [gone]
    assert outbox_count(shop) == 0
    shop.place(20)
    shop.place(21)
    events(shop.settings, shop.events_topic, 3)
    result = changeflow(shop.file, "outbox", "prune", "--wait", "90")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("outbox orders: 2 captured row(s) deleted (slot confirmed ")
    assert outbox_count(shop) == 0
    # The connector paused: its slot confirms nothing more, so the new rows are not captured and stay.
    connector(shop, "PUT", "/pause")
    eventually(lambda: task_states(shop.settings, shop.pipeline.connector_name("postgres")) == ["PAUSED"],
               what="connector paused")
    late = shop.place(22)
    result = changeflow(shop.file, "outbox", "prune", "--wait", "3")
    assert result.returncode == 1
    assert result.stdout.startswith("outbox orders: 1 row(s), none deleted: slot ")
    assert outbox_count(shop) == 1
    connector(shop, "PUT", "/resume")
    wait_running(shop)
    assert late in [e.id for e in events(shop.settings, shop.events_topic, 4)]
    result = changeflow(shop.file, "outbox", "prune", "--wait", "90")
    assert result.returncode == 0, result.stdout + result.stderr
    assert outbox_count(shop) == 0


def test_the_event_log_in_clickhouse_holds_one_row_per_event_id(shop: Shop) -> None:
    from changeflow.outbox.eventlog import load as load_events
    from changeflow.outbox.events import idle_stop
    from changeflow.reports import home
    from changeflow.sinks.clickhouse import client_for

    ids = [shop.place(30, "ada", 100), shop.place(31, "bob", 200)]
    events(shop.settings, shop.events_topic, 2)
    result = changeflow(shop.file, "outbox", "eventlog", "--idle", "4")
    assert result.returncode == 0, result.stdout + result.stderr
    database = home.database(shop.pipeline)
    assert result.stdout.strip() == f"outbox orders: 2 event(s) loaded into {database}.outbox_orders"
    # A replay from offset 0 (another group) inserts both again: still one row per event id.
    client = client_for(shop.settings)
    try:
        spec = specs(shop.pipeline)[0]
        assert load_events(client, shop.settings.kafka_bootstrap, database, spec, f"{database}-again",
                           stop=idle_stop(4)) == 2
        rows = client.query(f"SELECT event_id, topic, aggregate_id, type, payload, headers FROM `{database}`."
                            "`outbox_orders` FINAL ORDER BY aggregate_id").result_rows
    finally:
        client.close()
    assert [r[0] for r in rows] == ids
    assert rows[0][1:4] == (shop.events_topic, "30", "order_placed")
    assert json.loads(rows[0][4]) == {"customer": "ada", "total_cents": 100, "order_id": 30}
    assert rows[0][5]["trace_id"] == "trace-1" and rows[0][5]["id"] == ids[0]


def test_a_declared_domain_event_has_a_stable_id_and_is_applied_once_through_the_inbox(
        shop: Shop, tmp_path: Path) -> None:
    """`events: shipped: {when: ..., fields: [...]}` on the orders entity, through a worker of the pipeline's
    own: the event carries its fields and a stable id header, and the inbox applies it once."""
    import os

    from changeflow.outbox.inbox import Inbox
    from tests.integration.conftest import stop_process

    with psycopg.connect(shop.dsn, autocommit=True) as conn:
        conn.execute("ALTER TABLE public.orders ADD COLUMN status text NOT NULL DEFAULT 'new'")
        conn.execute("ALTER TABLE public.orders REPLICA IDENTITY FULL")
    doc = yaml.safe_load(shop.file.read_text())
    doc["entities"]["orders"]["events"] = {"shipped": {
        "when": "old.status != 'shipped' and new.status == 'shipped'", "fields": ["customer", "total_cents"]}}
    shop.file.write_text(yaml.safe_dump(doc))
    assert changeflow(shop.file, "pipeline", "check").returncode == 0
    assert changeflow(shop.file, "connectors", "apply").returncode == 0
    env = {**os.environ, "CHANGEFLOW_WORKER_WEB_PORT": "6171", "PYTHONUNBUFFERED": "1"}
    log = (tmp_path / "worker.log").open("w")
    worker = subprocess.Popen([sys.executable, "-m", "changeflow", "--pipeline", str(shop.file), "worker",
                               "--sinks", "redis"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        shop.place(40, "ada", 900)
        with psycopg.connect(shop.dsn, autocommit=True) as conn:
            conn.execute("UPDATE public.orders SET status = 'packed' WHERE id = 40")  # not shipped: no event
            conn.execute("UPDATE public.orders SET status = 'shipped' WHERE id = 40")
            conn.execute("UPDATE public.orders SET total_cents = 950 WHERE id = 40")  # shipped already
        topic = f"{shop.pipeline.namespace}.orders.shipped"
        [event] = events(shop.settings, topic, 1)
    finally:
        stop_process(worker)
        log.close()
    assert event.id.startswith("orders.shipped:orders:40@")
    assert (event.aggregate_type, event.aggregate_id, event.type) == ("orders", "orders:40", "orders.shipped")
    assert event.payload["fields"] == {"customer": "ada", "total_cents": 900}
    assert event.id == event.payload["event_id"]
    # The same event twice (a redelivery): applied once.
    inbox = Inbox("public.inbox")
    with psycopg.connect(shop.consumer_dsn, autocommit=True) as conn:
        inbox.create(conn)
        conn.execute("CREATE TABLE shipped (order_key text, n integer)")
        again = events(shop.settings, topic, 1)[0]
        applied = [inbox.apply(conn, e, lambda cur, e: cur.execute("INSERT INTO shipped VALUES (%s, 1)",
                                                                   (e.aggregate_id,))) for e in (event, again)]
        assert applied == [True, False]
        assert conn.execute("SELECT order_key, n FROM shipped").fetchall() == [("orders:40", 1)]


def test_debeziums_default_column_names_and_empty_or_invalid_json_payloads(shop: Shop) -> None:
    """A second outbox with Debezium's own column names and a `text` payload: empty, invalid JSON, JSON and
    null payloads are each published (as the text they hold); `event.data` refuses the invalid ones."""
    with psycopg.connect(shop.dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.outbox_raw (id uuid PRIMARY KEY, aggregatetype text NOT NULL, "
                     "aggregateid text, type text, payload text)")
    doc = yaml.safe_load(shop.file.read_text())
    doc["outbox"]["raw"] = {"table": "public.outbox_raw", "expand_json_payload": True}
    shop.file.write_text(yaml.safe_dump(doc))
    checked = changeflow(shop.file, "pipeline", "check")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    applied = changeflow(shop.file, "connectors", "apply")
    assert applied.returncode == 0, applied.stdout + applied.stderr
    payloads = {"empty": "", "invalid": "{not json", "json": '{"n": 1.10}', "null": None}
    ids = {}
    with psycopg.connect(shop.dsn, autocommit=True) as conn:
        for case, payload in payloads.items():
            ids[case] = str(uuid.uuid4())
            conn.execute("INSERT INTO public.outbox_raw VALUES (%s, 'text', 'k', %s, %s)", (ids[case], case, payload))
    got = {e.type: e for e in events(shop.settings, f"{shop.pipeline.namespace}.events.text", 4)}
    assert {case: got[case].id for case in payloads} == ids
    # Expanded by the router: numbers pass through Connect's float64 (1.10 arrives as 1.1; README).
    assert got["json"].payload == {"n": Decimal("1.1")}
    assert got["null"].payload is None
    for case in ("empty", "invalid"):
        assert got[case].payload == payloads[case]  # kept as the text it was (Debezium warns in its log)
        with pytest.raises(ValueError):
            _ = got[case].data
    assert_running(shop)
