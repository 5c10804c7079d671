"""Remove everything one benchmark run created, whatever stage it reached; safe to run twice."""

from __future__ import annotations

import contextlib
import time
from typing import Any

import httpx
import psycopg
import redis
from psycopg import sql

from changeflow.bench.common import (
    BENCH_REDIS_DBS,
    BenchSettings,
    Isolation,
    delete_groups_with_prefix,
    delete_topics_with_prefix,
)
from changeflow.sinks.clickhouse import client_for

STAGES = ("backlog", "snapshot")


def snapshot_names(run_id: str) -> dict[str, str]:
    return {
        "connector": f"bench-{run_id}-snapshot",
        "database": f"bench_{run_id}",
        "slot": f"bench_{run_id}",
        "publication": f"bench_{run_id}_pub",
    }


def freshness_sku_prefix(run_id: str) -> str:
    return f"BENCH{run_id.upper()}-"


def _redis(settings: BenchSettings, run_id: str, db: int) -> int:
    client = redis.Redis.from_url(settings.redis_db_url(db))
    run_block = Isolation(run_id, "backlog").id_base // 10_000_000_000
    removed = 0

    def ours(key: bytes) -> bool:
        # bench-<run>-...: the naive consumer's keys; bench_<run>_<stage>:versions/:applied: a stage's hashes.
        if key.startswith((f"bench-{run_id}-".encode(), f"bench_{run_id}_".encode())):
            return True
        tail = key.rsplit(b":", 1)[-1]
        return tail.isdigit() and int(tail) // 10_000_000_000 == run_block

    try:
        batch: list[bytes] = []
        for key in client.scan_iter(count=5000):
            if ours(key):
                batch.append(key)
            if len(batch) >= 5000:
                removed += client.delete(*batch)
                batch = []
        if batch:
            removed += client.delete(*batch)
    finally:
        client.close()
    return removed


def cleanup(settings: BenchSettings, run_id: str) -> dict[str, Any]:
    """Connector and slot first (they hold WAL), then database, topics, groups, indexes, tables, keys, rows."""
    done: dict[str, Any] = {}
    names = snapshot_names(run_id)
    from changeflow.connectors.client import KafkaConnectClient

    client = KafkaConnectClient(settings.connect_url, timeout=30)
    try:
        done["connector_deleted"] = client.delete(names["connector"]) if names["connector"] in client.list() else False
    finally:
        client.close()
    with psycopg.connect(settings.pg_dsn, autocommit=True) as conn:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            row = conn.execute("SELECT active FROM pg_replication_slots WHERE slot_name = %s",
                               (names["slot"],)).fetchone()
            if row is None:
                break
            if not row[0]:
                conn.execute("SELECT pg_drop_replication_slot(%s)", (names["slot"],))
                done["slot_dropped"] = True
                break
            time.sleep(0.5)
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(names["database"])))
        deleted = conn.execute("DELETE FROM products WHERE sku LIKE %s", (freshness_sku_prefix(run_id) + "%",))
        done["freshness_rows_deleted"] = deleted.rowcount
    # bench-<run>-...: raw topics and the naive consumers' groups; bench_<run>_<stage>...: what a stage's
    # pipeline names (canonical, DLQ and schema topics, decode and sink groups).
    prefixes = (f"bench-{run_id}-", f"bench_{run_id}_")
    done["topics_deleted"] = sum(len(delete_topics_with_prefix(settings, p)) for p in prefixes)
    done["groups_deleted"] = sum(len(delete_groups_with_prefix(settings, p)) for p in prefixes)
    with contextlib.suppress(httpx.HTTPError):
        indices = httpx.get(f"{settings.search_url}/_cat/indices/bench-{run_id}-*?format=json", timeout=30).json()
        for index in indices:
            httpx.delete(f"{settings.search_url}/{index['index']}", timeout=30)
        done["indexes_deleted"] = len(indices)
    ch = client_for(settings)
    try:
        for stage in STAGES:
            ch.command(f"DROP DATABASE IF EXISTS {Isolation(run_id, stage).clickhouse_database}")
    finally:
        ch.close()
    done["redis_keys_deleted"] = sum(_redis(settings, run_id, db) for db in BENCH_REDIS_DBS)
    return done
