"""Read models (#21) against the real stack: "orders of users in New York" and orders per user and status,
kept fresh by a worker of the test's own, through every order of arrival, a restart, a SIGKILL and a takeover
by a second worker. Every case ends with each store equal to the same join computed at the source in SQL.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import redis
from psycopg import sql

from changeflow.settings import Settings
from changeflow.sinks.clickhouse import client_for
from changeflow.streams.keys import key_text
from tests.integration.conftest import eventually, redis_url, search_url, stop_process
from tests.integration.test_own_database import _answers, _drop_everything, changeflow

pytestmark = pytest.mark.integration

PORTS = (6181, 6182)

PIPELINE = """\
name: {name}
sources:
  postgres:
    database: {database}
entities:
  users:
    table: public.users
  orders:
    table: public.orders
views:
  ny_orders:
    from: orders
    join:
      user: {{entity: users, on: user_id}}
    fields:
      total: total
      status: status
      user_name: user.name
      city: user.profile.address.city
    filter: "city == 'New York'"
  order_stats:
    from: orders
    fields: {{user_id: user_id, status: status, total: total}}
    group_by: [user_id, status]
    aggregates:
      orders: count
      revenue: {{sum: total}}
      smallest: {{min: total}}
      largest: {{max: total}}
"""

NY_SQL = """
SELECT o.id, o.total, o.status, u.name AS user_name, u.profile->'address'->>'city' AS city
FROM orders o LEFT JOIN users u ON u.id = o.user_id
WHERE u.profile->'address'->>'city' = 'New York' ORDER BY o.id
"""
STATS_SQL = """
SELECT user_id, status, count(*) AS orders, sum(total) AS revenue, min(total) AS smallest, max(total) AS largest
FROM orders WHERE user_id IS NOT NULL AND status IS NOT NULL GROUP BY user_id, status ORDER BY user_id, status
"""


class Views:
    """The test's own database, pipeline and workers."""

    def __init__(self, settings: Settings, tmp: Path) -> None:
        self.settings = settings
        self.tmp = tmp
        tag = uuid.uuid4().hex[:8]
        self.name, self.database = f"views_{tag}", f"cf_views_{tag}"
        self.file = tmp / "pipeline.yml"
        self.workers: dict[int, subprocess.Popen[Any]] = {}

    @property
    def dsn(self) -> str:
        return psycopg.conninfo.make_conninfo(self.settings.pg_dsn, dbname=self.database)

    def sql(self, statement: str, *params: Any) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(statement, params or None)  # type: ignore[arg-type]

    def query(self, statement: str) -> list[dict[str, Any]]:
        with psycopg.connect(self.dsn) as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
            return cur.execute(statement).fetchall()  # type: ignore[arg-type]

    def start_worker(self, port: int) -> None:
        env = {**os.environ, "CHANGEFLOW_WORKER_WEB_PORT": str(port), "PYTHONUNBUFFERED": "1"}
        log = (self.tmp / f"worker-{port}.log").open("a")
        self.workers[port] = subprocess.Popen(
            [sys.executable, "-m", "changeflow", "--pipeline", str(self.file), "worker"], cwd=self.tmp, env=env,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        eventually(lambda: self.workers[port].poll() is None and _answers(port), timeout=120,
                   what=f"worker on {port} up")

    def stop_worker(self, port: int) -> int:
        return stop_process(self.workers.pop(port))

    def kill_worker(self, port: int) -> None:
        """SIGKILL to the worker and every process of it (the view stage and the sinks) at once."""
        worker = self.workers.pop(port)
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(30)

    # --- what the stores hold -------------------------------------------------------------------------
    def redis_rows(self, view: str) -> dict[str, Any]:
        rds = redis.Redis.from_url(redis_url(self.settings))
        prefix = f"{self.name}:{view}:"
        return {k.decode()[len(prefix):]: json.loads(rds.get(k) or b"null")
                for k in rds.scan_iter(match=f"{prefix}*", count=1000) if rds.type(k) == b"string"}

    def search_rows(self, view: str) -> dict[str, Any]:
        index = f"{self.name}-{view}"
        httpx.post(f"{search_url(self.settings)}/{index}/_refresh", timeout=30)
        response = httpx.post(f"{search_url(self.settings)}/{index}/_search", json={"size": 10000}, timeout=30)
        if response.status_code == 404:
            return {}
        return {hit["_id"]: hit["_source"] for hit in response.json()["hits"]["hits"]}

    def clickhouse_rows(self, view: str) -> dict[str, Any]:
        ch = client_for(self.settings)
        try:
            result = ch.query(f"SELECT * EXCEPT (_version, _is_deleted, _ts_ms, _ingested_at) "
                              f"FROM `{self.name}`.`{view}` FINAL WHERE NOT _is_deleted")
        except Exception as exc:
            if "UNKNOWN_TABLE" in str(exc) or "doesn't exist" in str(exc) or "UNKNOWN_DATABASE" in str(exc):
                return {}
            raise
        finally:
            ch.close()
        out = {}
        for row in result.result_rows:
            item = dict(zip(result.column_names, row, strict=True))
            out[item.pop("_key")] = item
        return out


def _json(value: Any) -> Any:
    return str(value) if isinstance(value, Decimal) else value


def expected_ny(v: Views) -> dict[str, dict[str, Any]]:
    return {str(r["id"]): r for r in v.query(NY_SQL)}


def expected_stats(v: Views) -> dict[str, dict[str, Any]]:
    return {key_text([r["user_id"], r["status"]]): r for r in v.query(STATS_SQL)}


def in_every_store(v: Views) -> bool:
    """Each store holds exactly the join and the aggregates computed at the source now."""
    ny, stats = expected_ny(v), expected_stats(v)
    ny_json = {k: {c: _json(x) for c, x in r.items()} for k, r in ny.items()}
    stats_json = {k: {c: _json(x) for c, x in r.items()} for k, r in stats.items()}
    assert v.redis_rows("ny_orders") == ny_json
    assert v.search_rows("ny_orders") == ny_json
    assert v.clickhouse_rows("ny_orders") == ny
    assert v.redis_rows("order_stats") == stats_json
    assert v.search_rows("order_stats") == stats_json
    assert v.clickhouse_rows("order_stats") == stats
    return True


@pytest.fixture
def views(live_stack: Settings, tmp_path: Path) -> Iterator[Views]:
    v = Views(live_stack, tmp_path)
    with psycopg.connect(live_stack.pg_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(v.database)))
    try:
        v.sql("CREATE TABLE users (id integer PRIMARY KEY, name text, profile jsonb)")
        v.sql("CREATE TABLE orders (id integer PRIMARY KEY, user_id integer, total numeric(12,2), status text)")
        v.sql("INSERT INTO users VALUES (1, 'Ann', '{\"address\": {\"city\": \"New York\"}}'), "
              "(2, 'Bob', '{\"address\": {\"city\": \"Boston\"}}')")
        v.sql("INSERT INTO orders SELECT g, 1 + g % 2, g * 1.01, CASE WHEN g % 3 = 0 THEN 'open' ELSE 'paid' END "
              "FROM generate_series(1, 20) g")
        v.file.write_text(PIPELINE.format(name=v.name, database=v.database))
        result = changeflow(v.file, "pipeline", "check")
        assert result.returncode == 0, result.stdout + result.stderr
        result = changeflow(v.file, "connectors", "apply", "--timeout", "150")
        assert result.returncode == 0, result.stdout + result.stderr
        yield v
    finally:
        for port in list(v.workers):
            stop_process(v.workers.pop(port))
        _drop_everything(live_stack, v.database, v.name)


def test_views_follow_every_order_of_arrival_into_every_store(views: Views) -> None:
    v = views
    v.start_worker(PORTS[0])
    eventually(lambda: in_every_store(v), timeout=120, what="the snapshot's views")
    assert len(expected_ny(v)) == 10

    # An order before its user: it joins once the user exists and lives in New York.
    v.sql("INSERT INTO orders VALUES (100, 50, 9.99, 'paid')")
    v.sql("INSERT INTO users VALUES (50, 'Cat', '{\"address\": {\"city\": \"Denver\"}}')")
    v.sql("UPDATE users SET profile = '{\"address\": {\"city\": \"New York\"}}' WHERE id = 50")
    # The user moves: every one of their orders leaves the view, then comes back.
    v.sql("UPDATE users SET profile = '{\"address\": {\"city\": \"Chicago\"}}' WHERE id = 1")
    eventually(lambda: in_every_store(v), timeout=60, what="user 1 moved out")
    assert set(expected_ny(v)) == {"100"}
    v.sql("UPDATE users SET profile = '{\"address\": {\"city\": \"New York\"}, \"vip\": true}' WHERE id = 1")
    # user_id A -> B -> A quickly, to a user that does not exist, to NULL.
    for target in (2, 1, 2, 1):
        v.sql("UPDATE orders SET user_id = %s WHERE id = 2", target)
    v.sql("UPDATE orders SET user_id = 404 WHERE id = 4")
    v.sql("UPDATE orders SET user_id = NULL WHERE id = 6")
    # A user deleted, then created again with the same id; an order deleted; a primary key changed.
    v.sql("DELETE FROM users WHERE id = 50")
    v.sql("INSERT INTO users VALUES (50, 'Cat again', '{\"address\": {\"city\": \"New York\"}}')")
    v.sql("DELETE FROM orders WHERE id = 8")
    v.sql("UPDATE orders SET id = 200 WHERE id = 10")
    # Aggregates: a row moving to another group (status, user), exact decimals.
    v.sql("UPDATE orders SET status = 'open', total = 0.01 WHERE id = 12")
    v.sql("UPDATE orders SET user_id = 2 WHERE id = 14")
    eventually(lambda: in_every_store(v), timeout=60, what="every case")
    assert expected_ny(v)["2"]["user_name"] == "Ann" and "4" not in expected_ny(v) and "6" not in expected_ny(v)
    assert expected_ny(v)["100"]["user_name"] == "Cat again"

    # reconcile --full computes both views at the source (SQL) and finds every key and value in every store.
    result = changeflow(v.file, "reconcile", "--full", "--format", "json")
    report = json.loads(result.stdout)
    assert result.returncode == 0, [(r["store"], r["entity"], r["diffs"][:3], r["error"]) for r in report["results"]
                                    if r["drift"] or r["error"]]
    checked = {(r["entity"], r["store"]) for r in report["results"]}
    assert checked == {(e, s) for e in ("users", "orders", "ny_orders", "order_stats")
                       for s in ("redis", "search", "clickhouse")}
    assert {r["entity"]: r["source_count"] for r in report["results"] if r["store"] == "redis"} == {
        "users": 3, "orders": 20, "ny_orders": len(expected_ny(v)), "order_stats": len(expected_stats(v))}
    assert not report["skipped"]
    drift = changeflow(v.file, "report", "drift", "--format", "json")
    assert drift.returncode == 0, drift.stdout + drift.stderr
    assert {r["entity"]: r["source"] for r in json.loads(drift.stdout)} == {
        "users": 3, "orders": 20, "ny_orders": len(expected_ny(v)), "order_stats": len(expected_stats(v))}

    # A clean restart keeps the state (nothing is rebuilt) and goes on.
    assert v.stop_worker(PORTS[0]) == 0
    v.sql("UPDATE users SET name = 'Ann B.' WHERE id = 1")
    v.start_worker(PORTS[0])
    eventually(lambda: in_every_store(v), timeout=90, what="after a restart")
    assert "views_state_reset" not in (v.tmp / f"worker-{PORTS[0]}.log").read_text()

    # SIGKILL in the middle of a fan-out of 3,000 orders, then a restart.
    v.sql("INSERT INTO orders SELECT g, 2, 1.00, 'paid' FROM generate_series(1000, 3999) g")
    eventually(lambda: in_every_store(v), timeout=120, what="3,000 more orders")
    v.sql("UPDATE users SET profile = '{\"address\": {\"city\": \"New York\"}}' WHERE id = 2")
    eventually(lambda: len(v.redis_rows("ny_orders")) > len(expected_ny(v)) // 4 or in_every_store(v), timeout=60,
               interval=0.05, what="the fan-out under way")
    v.kill_worker(PORTS[0])
    v.sql("UPDATE orders SET total = 2.50 WHERE id = 1500")
    v.start_worker(PORTS[0])
    eventually(lambda: in_every_store(v), timeout=120, what="after a SIGKILL mid fan-out")

    # A second worker; the first stops: the second takes the views over, rebuilds them from the canonical
    # topics and publishes each view row once, newer than any before.
    v.start_worker(PORTS[1])
    assert v.stop_worker(PORTS[0]) == 0
    v.sql("UPDATE users SET profile = '{\"address\": {\"city\": \"Boston\"}}' WHERE id = 2")
    v.sql("UPDATE orders SET status = 'refunded' WHERE id = 1")
    eventually(lambda: in_every_store(v), timeout=120, what="after a takeover by the second worker")
    assert "views_state_reset" in (v.tmp / f"worker-{PORTS[1]}.log").read_text() or \
        "views_started" in (v.tmp / f"worker-{PORTS[1]}.log").read_text()

    # A view added to the running pipeline is filled from the entities' current state (the compacted
    # canonical topics), not from a new snapshot of the sources.
    v.file.write_text(v.file.read_text() + """\
  big_orders:
    from: orders
    fields: {total: total}
    filter: "total > 5"
""")
    assert v.stop_worker(PORTS[1]) == 0
    v.start_worker(PORTS[1])
    big = {str(r["id"]): {"id": r["id"], "total": str(r["total"])}
           for r in v.query("SELECT id, total FROM orders WHERE total > 5")}
    eventually(lambda: v.redis_rows("big_orders") == big and in_every_store(v), timeout=120,
               what="a view added while running")
    assert "the pipeline's views changed" in (v.tmp / f"worker-{PORTS[1]}.log").read_text()

    # Dropping a view removes what it created: refused while the worker runs, then its rows, table, index and
    # topic go; the other views stay.
    refused = changeflow(v.file, "views", "drop", "big_orders", "--yes")
    assert refused.returncode == 1 and "is running" in refused.stderr and "nothing was removed" in refused.stderr
    assert v.stop_worker(PORTS[1]) == 0
    dropped = changeflow(v.file, "views", "drop", "big_orders", "--yes")
    assert dropped.returncode == 0, dropped.stdout + dropped.stderr
    assert f"clickhouse: table {v.name}.big_orders dropped" in dropped.stdout
    assert f"search: index {v.name}-big_orders" in dropped.stdout
    assert f"kafka: topic {v.name}.big_orders deleted" in dropped.stdout
    assert v.redis_rows("big_orders") == {} and v.search_rows("big_orders") == {}
    assert v.clickhouse_rows("big_orders") == {}
    assert v.redis_rows("ny_orders") == {k: {c: _json(x) for c, x in r.items()} for k, r in expected_ny(v).items()}

    # connectors delete --purge, then apply again: the pipeline's topics and groups go, the views' lease and
    # Faust's own with them, so the view stage (its state still on disk) rebuilds the views from the new
    # snapshot instead of trusting that state, and every store holds them again.
    # First the file without the dropped view, and a worker run on it: the stage's state on disk is then
    # current for the views the file declares, so only the purge can tell it to rebuild.
    v.file.write_text(PIPELINE.format(name=v.name, database=v.database))
    v.start_worker(PORTS[1])
    eventually(lambda: in_every_store(v), timeout=120, what="the views without big_orders")
    assert v.stop_worker(PORTS[1]) == 0

    def purge() -> subprocess.CompletedProcess[str] | None:
        """A worker stopped while its consumer was still joining leaves a member until the group's session
        timeout (10 s): the purge refuses until then, and removes nothing meanwhile."""
        done = changeflow(v.file, "connectors", "delete", "--yes", "--purge")
        assert done.returncode == 0 or "is running" in done.stderr, done.stdout + done.stderr
        return done if done.returncode == 0 else None

    purged = eventually(purge, timeout=60, interval=2, what="the purge")
    for line in (f"kafka: topic {v.name}.views.lease deleted",
                 f"kafka: topic {v.name}-worker-__assignor-__leader deleted",
                 f"kafka: consumer group {v.name}-views deleted",
                 f"kafka: consumer group {v.name}-worker deleted"):
        assert line in purged.stdout, (line, purged.stdout)
    assert v.redis_rows("ny_orders") == {} and v.clickhouse_rows("order_stats") == {}
    applied = changeflow(v.file, "connectors", "apply", "--timeout", "150")
    assert applied.returncode == 0, applied.stdout + applied.stderr
    log = v.tmp / f"worker-{PORTS[1]}.log"
    before = len(log.read_text())
    v.start_worker(PORTS[1])
    eventually(lambda: in_every_store(v) and expected_ny(v), timeout=180, what="the views after a purge")
    assert "views_state_reset" in log.read_text()[before:]
