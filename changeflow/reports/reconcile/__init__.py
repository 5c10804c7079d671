"""Drift reconciliation: every key of the source against every registered store, content included.

Counts alone (``changeflow/reports/drift.py``) miss a row that is present but wrong. Here each side's row is
brought to one *comparable* form (``normalise``, driven by the canonical column types), hashed per key,
and the hashes are summed per key range (``digest``), so a full compare reads each side once and only
the buckets whose checksums differ are examined key by key.

The source row (``source``) is computed with the entity's own compiled transform from the row read with
psycopg, its values typed the way the Debezium decoder types them; each store's rows come raw from the
store's own ``scan``/``fetch`` and are normalised here.

Kinds of drift, per (entity, store, key): ``missing`` (the source has the key, the store does not),
``extra`` (the store has it, the source does not), ``stale`` (the content differs and the store holds a
genuine but older image: the changelog has exactly that content at the store's version, or another store
that matches the source holds a newer version), ``mismatched`` (an image the pipeline never wrote at that
version). Changes in flight are not drift: differing keys are read again after a short settle time.

Modules: ``normalise`` and ``digest`` are pure; ``source`` reads PostgreSQL; ``run`` orchestrates over
``sinks.base.registry()``; ``record`` keeps the history in ClickHouse; ``repair`` re-syncs drifted keys.
"""

from changeflow.reports.reconcile.digest import (
    KeyDiff,
    bucket_checksums,
    bucket_of,
    classify_content,
    diff_keys,
    field_differences,
    sort_key,
)
from changeflow.reports.reconcile.normalise import comparable_row, debezium_typed, normalise_value, row_digest
from changeflow.reports.reconcile.record import record_run
from changeflow.reports.reconcile.repair import RepairPlan, RepairReport, plan_repair, repair
from changeflow.reports.reconcile.result import KINDS, Diff, Run, StoreResult
from changeflow.reports.reconcile.run import reconcile, reconcile_entity, run_mode, select_entities
from changeflow.reports.reconcile.source import Source, source_row
from changeflow.sinks.reread import key_filter, snapshot_signals

__all__ = [
    "KINDS", "Diff", "KeyDiff", "RepairPlan", "RepairReport", "Run", "Source", "StoreResult", "bucket_checksums",
    "bucket_of", "classify_content", "comparable_row", "debezium_typed", "diff_keys",
    "field_differences", "key_filter", "normalise_value", "plan_repair", "reconcile", "reconcile_entity",
    "record_run", "repair", "row_digest", "run_mode", "select_entities", "snapshot_signals",
    "sort_key", "source_row",
]
