"""The report views, made in the store reports are queried in as soon as the worker's sink for it sets up.

A user who starts the worker and queries ``<pipeline>.finance_exceptions`` in ClickHouse gets the report,
not ``UNKNOWN_TABLE``: the card's "query reconciliation reports in ClickHouse" holds from the first minute.
The store's own tables (changelog, applied-through, reconciliation runs and diffs) are made by the store's
setup; the views over the pipeline's entities are made here, by the module that owns their SQL, through the
store's ``create_report_view``. ``changeflow report ...`` still re-creates them on demand.
"""

from __future__ import annotations

from typing import Any

from changeflow.pipelines.spec import Pipeline
from changeflow.reports import finance, home


def finance_entities_present(pipeline: Pipeline, store: str) -> bool:
    """The finance views read ``orders``, ``payments`` and ``refunds`` in the pipeline's own database: a
    pipeline without all three (every pipeline but commerce-like ones) has no finance report."""
    for name in finance.ENTITIES:
        spec = pipeline.entities.get(name)
        if spec is None or not spec.stored_in(store) or home.table_of(spec) != (home.database(pipeline), name):
            return False
    return True


def ensure(store: Any, pipeline: Pipeline) -> None:
    """Create or replace every report view that applies to ``pipeline`` in ``store`` (a no-op for a store
    reports are not queried in). Raises the store's error: the sink runner logs it and tries again later
    (a view cannot be made before the tables it reads exist)."""
    if not getattr(store, "reports_queried_here", False):
        return
    if finance_entities_present(pipeline, store.name):
        for statement in finance.view_statements(home.database(pipeline)):
            store.create_report_view(statement)
