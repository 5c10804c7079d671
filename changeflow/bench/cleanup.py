"""Remove everything one benchmark run created, whatever stage it reached; safe to run twice."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

from changeflow.bench.common import BenchSettings, Isolation, delete_groups_with_prefix, delete_topics_with_prefix
from changeflow.bench.naive import forget_keys
from changeflow.connectors.client import KafkaConnectClient
from changeflow.connectors.prepare import PrepareError, drop_slot
from changeflow.pipelines.spec import Pipeline
from changeflow.sinks.base import create, used_by

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


def cleanup(settings: BenchSettings, run_id: str, live: Pipeline) -> dict[str, Any]:
    """Connector and slot first (they hold WAL), then database, topics, groups, what each stage's pipeline made
    in each store (its ``purge``), the naive consumer's keys and the freshness rows."""
    done: dict[str, Any] = {}
    names = snapshot_names(run_id)

    client = KafkaConnectClient(settings.connect_url, timeout=30)
    try:
        done["connector_deleted"] = client.delete(names["connector"]) if names["connector"] in client.list() else False
    finally:
        client.close()
    with psycopg.connect(settings.pg_dsn, autocommit=True) as conn:
        try:
            done["slot_dropped"] = drop_slot(conn, names["slot"], timeout=60).endswith("dropped")
        except PrepareError as exc:  # said, and the rest is cleaned up regardless
            done.setdefault("errors", []).append(str(exc))
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(names["database"])))
        deleted = conn.execute("DELETE FROM products WHERE sku LIKE %s", (freshness_sku_prefix(run_id) + "%",))
        done["freshness_rows_deleted"] = deleted.rowcount
    # bench-<run>-...: raw topics and the naive consumers' groups; bench_<run>_<stage>...: what a stage's
    # pipeline names (canonical, DLQ and schema topics, decode and sink groups).
    prefixes = (f"bench-{run_id}-", f"bench_{run_id}_")
    done["topics_deleted"] = sum(len(delete_topics_with_prefix(settings, p)) for p in prefixes)
    done["groups_deleted"] = sum(len(delete_groups_with_prefix(settings, p)) for p in prefixes)
    purged: dict[str, int] = {}
    for stage in STAGES:
        pipeline = Isolation(run_id, stage).pipeline(live)
        for name in used_by(pipeline):
            store = create(name, settings, pipeline)
            try:
                purged[name] = purged.get(name, 0) + len(store.purge())
            except Exception as exc:  # a stage that never ran may have made nothing; say what failed, go on
                done.setdefault("errors", []).append(f"{name} purge of {stage}: {exc}")
            finally:
                store.close()
    done["store_objects_removed"] = purged
    done["naive_keys_deleted"] = forget_keys(settings, f"bench-{run_id}-")
    return done
