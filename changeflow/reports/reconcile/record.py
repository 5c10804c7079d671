"""History in ClickHouse: every run and its differing keys, in the pipeline's own database."""

from __future__ import annotations

from typing import TYPE_CHECKING

from changeflow.pipelines.spec import Pipeline
from changeflow.reports import home
from changeflow.reports.reconcile.result import Run

if TYPE_CHECKING:
    from changeflow.settings import Settings


def record_run(settings: Settings, pipeline: Pipeline, run: Run) -> None:
    """Append the run and its differing keys, so drift history is a ClickHouse query away."""
    db = home.database(pipeline)
    client = home.client(settings)
    try:
        # The tables are the home store's own (its setup creates them, so they can be queried from the first
        # minute); made here too for a run before any sink did.
        for ddl in home.reconciliation_ddl(db):
            client.command(ddl)
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
