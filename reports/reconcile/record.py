"""History in ClickHouse: every run and its differing keys, in the pipeline's own database."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipelines.spec import Pipeline
from reports.reconcile.result import Run

if TYPE_CHECKING:
    from changeflow.settings import Settings


def _q(name: str) -> str:
    from sinks.clickhouse import q

    return q(name)


def runs_ddl(database: str) -> str:
    return (
        f"CREATE TABLE IF NOT EXISTS {_q(database)}.reconciliation_runs (\n"
        "  run_id String, run_at DateTime64(3, 'UTC'), mode LowCardinality(String),\n"
        "  entity LowCardinality(String), store LowCardinality(String),\n"
        "  source_count UInt64, store_count UInt64, missing UInt64, missing_in_store UInt64,\n"
        "  missing_in_source UInt64, stale UInt64, mismatched UInt64, drift UInt64,\n"
        "  buckets UInt32, differing_buckets UInt32, error Nullable(String), duration_ms UInt64,\n"
        "  repair_of String\n"
        ")\nENGINE = MergeTree\nORDER BY (entity, store, run_at)"
    )


def diffs_ddl(database: str) -> str:
    return (
        f"CREATE TABLE IF NOT EXISTS {_q(database)}.reconciliation_diffs (\n"
        "  run_id String, run_at DateTime64(3, 'UTC'), entity LowCardinality(String),\n"
        "  store LowCardinality(String), key String, kind LowCardinality(String), detail String,\n"
        "  store_version Nullable(UInt64)\n"
        ")\nENGINE = MergeTree\nORDER BY (run_id, entity, store, key)"
    )


def record_run(settings: Settings, pipeline: Pipeline, run: Run) -> None:
    """Append the run and its differing keys, so drift history is a ClickHouse query away."""
    from sinks.clickhouse import client_for

    db = pipeline.clickhouse_database
    client = client_for(settings)
    try:
        client.command(runs_ddl(db))
        client.command(diffs_ddl(db))
        duration_ms = int(run.duration_s * 1000)
        rows = []
        for r in run.results:
            d = r.as_dict()
            rows.append([
                run.run_id, run.run_at, run.mode, r.entity, r.store, r.source_count, r.store_count, d["missing"],
                d["missing_in_store"], d["missing_in_source"], d["stale"], d["mismatched"], r.drift, r.buckets,
                len(r.differing_buckets), r.error, duration_ms, run.repair_of,
            ])
        if rows:
            client.insert("reconciliation_runs", rows, database=db, column_names=[
                "run_id", "run_at", "mode", "entity", "store", "source_count", "store_count", "missing",
                "missing_in_store", "missing_in_source", "stale", "mismatched", "drift", "buckets",
                "differing_buckets", "error", "duration_ms", "repair_of",
            ])
        diffs = [
            [run.run_id, run.run_at, r.entity, r.store, d.key, d.kind, d.detail, d.store_version]
            for r in run.results for d in r.diffs
        ]
        for i in range(0, len(diffs), 50_000):
            client.insert("reconciliation_diffs", diffs[i : i + 50_000], database=db, column_names=[
                "run_id", "run_at", "entity", "store", "key", "kind", "detail", "store_version",
            ])
    finally:
        client.close()
