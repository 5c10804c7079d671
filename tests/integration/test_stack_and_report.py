"""The stack's own commands and the drift report, as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import psycopg
import pytest
import redis

from changeflow.deploy import stack
from changeflow.deploy.clickhouse import ClickHouseService
from changeflow.deploy.redis import RedisServerSettings
from changeflow.deploy.workload import run_products
from changeflow.pipelines.spec import Pipeline
from changeflow.reports.drift import drift
from changeflow.settings import Settings
from tests.integration.conftest import eventually, redis_url, search_url

pytestmark = pytest.mark.integration


def changeflow(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "changeflow", *args], capture_output=True, text=True, timeout=timeout)


def test_stack_up_is_idempotent_and_status_json_reports_every_service(live_stack: Settings) -> None:
    pids = {s.name: s.pid for s in stack.status(live_stack)}
    result = changeflow("stack", "up")
    assert result.returncode == 0, result.stderr
    assert {s.name: s.pid for s in stack.status(live_stack)} == pids  # nothing restarted

    status = json.loads(changeflow("stack", "status", "--json").stdout)
    by_name = {s["name"]: s for s in status}
    services = {"postgres", "redis", "clickhouse", "search", "kafka", "connect"}
    assert set(by_name) == services | {"worker"}  # the worker row: any worker answering on its web port
    assert all(by_name[name]["healthy"] for name in services), status
    assert by_name["search"]["url"] == search_url(live_stack)
    assert by_name["clickhouse"]["url"] == ClickHouseService(live_stack).url


def test_the_superuser_needs_its_password_on_loopback_and_psql_is_one_line(live_stack: Settings) -> None:
    """Issue 20 §2: no local process becomes superuser for free; README's psql line still works."""
    url = f"postgresql://postgres@127.0.0.1:{live_stack.pg_port}/commerce"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    refused = subprocess.run(["psql", "-w", url, "-tAc", "SELECT 1"], capture_output=True, text=True, timeout=30,
                             env=env)
    assert refused.returncode != 0
    assert "no password supplied" in refused.stderr or "password authentication failed" in refused.stderr
    wrong = subprocess.run(["psql", "-w", url, "-tAc", "SELECT 1"], capture_output=True, text=True, timeout=30,
                           env={**env, "PGPASSWORD": "guess"})
    assert wrong.returncode != 0 and "password authentication failed" in wrong.stderr
    # README: PGPASSWORD=$(cat .changeflow/secrets/pg_superuser_password) psql postgresql://postgres@...
    secret = (live_stack.state / "secrets" / "pg_superuser_password").read_text().strip()
    assert (live_stack.state / "secrets" / "pg_superuser_password").stat().st_mode & 0o777 == 0o600
    result = subprocess.run(["psql", url, "-tAc", "SHOW wal_level"], capture_output=True, text=True, timeout=30,
                            env={**env, "PGPASSWORD": secret})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "logical"


def test_redis_requires_the_stacks_password_and_runs_protected(live_stack: Settings) -> None:
    """Issue 20 §2: without the password no command runs (so no CONFIG SET dir writes files as root)."""
    server = RedisServerSettings()
    anonymous = redis.Redis(host=server.host, port=server.port, socket_timeout=5)
    with pytest.raises(redis.AuthenticationError):
        anonymous.config_set("dir", "/tmp")
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host=server.host, port=server.port, password="guess").ping()
    client = redis.Redis.from_url(redis_url(live_stack))
    assert {str(k, "utf-8") if isinstance(k, bytes) else k: str(v, "utf-8") if isinstance(v, bytes) else v
            for k, v in client.config_get("protected-mode").items()} == {"protected-mode": "yes"}
    # The secrets never show in what the stack prints.
    shown = subprocess.run([sys.executable, "-m", "changeflow", "stack", "status", "--json"], capture_output=True,
                           text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    for secret in ("redis_password", "pg_superuser_password", "clickhouse_password"):
        value = (live_stack.state / "secrets" / secret).read_text().strip()
        assert value and value not in shown.stdout, secret
    assert (live_stack.state / "redis" / "redis.conf").stat().st_mode & 0o777 == 0o600


def test_replication_role_needs_its_password(live_stack: Settings) -> None:
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(
            f"postgresql://debezium:wrong@127.0.0.1:{live_stack.pg_port}/commerce", connect_timeout=5
        ).close()


def test_workload_ends_with_zero_drift_in_the_report(pipeline: Settings, commerce: Pipeline, sku_prefix: str) -> None:
    result = run_products(pipeline.pg_dsn, inserts=60, updates=25, deletes=10, sku_prefix=sku_prefix)
    assert (result.inserted, result.updated, result.deleted) == (60, 25, 10)
    rows = eventually(lambda: (r := drift(pipeline, commerce)) and all(x.drift == 0 for x in r) and r, timeout=120,
                      what="zero drift")
    with psycopg.connect(pipeline.pg_dsn) as conn:
        count = conn.execute("SELECT count(*) FROM products").fetchone()
    assert count is not None
    products = next(r for r in rows if r.entity == "products")
    assert products.source == count[0]
    assert products.stores == dict.fromkeys(products.stores, count[0]) and len(products.stores) >= 3

    report = changeflow("report", "drift", "--format", "json")
    assert report.returncode == 0, report.stderr
    parsed = {row["entity"]: row for row in json.loads(report.stdout)}
    # The PostgreSQL entities, and order_stats (a view computed at the source); ny_orders reads MongoDB's users.
    assert set(parsed) == {"products", "orders", "payments", "refunds", "order_stats"}
    assert parsed["products"] == {"entity": "products", "source": count[0], "clickhouse": count[0],
                                  "redis": count[0], "search": count[0], "drift": 0}
    assert parsed["payments"]["redis"] == "n/a" and parsed["payments"]["search"] == "n/a"
    assert all(row["drift"] == 0 for row in parsed.values())
    with psycopg.connect(pipeline.pg_dsn, autocommit=True) as conn:
        conn.execute("DELETE FROM products WHERE sku LIKE %s", (f"{sku_prefix}-%",))
