"""Drift report: per entity, the row count in the source against every registered store holding it.

Counts are what a user checks first after an incident; key-level reconciliation (``reports.reconcile``)
builds on this. Each store counts its own live rows (``Store.count``: deletes applied); the source is
counted for PostgreSQL entities (a MongoDB entity's source count is not read here).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rich.table import Table

from changeflow.pipelines.catalog import count_rows
from changeflow.pipelines.load import load
from changeflow.pipelines.spec import EntitySpec, Pipeline
from changeflow.reports.reconcile.source import Source
from changeflow.reports.reconcile.views import unsupported
from changeflow.sinks.base import Store, create, names, used_by

if TYPE_CHECKING:
    from changeflow.settings import Settings

log = logging.getLogger("changeflow.drift")
NOT_MAPPED = -1  # the entity is not held by that store


@dataclass(frozen=True)
class DriftRow:
    entity: str
    source: int | None
    stores: dict[str, int | None] = field(default_factory=dict)  # store → count; None unreachable

    @property
    def drift(self) -> int | None:
        """The largest count difference between the source and a store; None if one is unreachable."""
        counts = [c for c in self.stores.values() if c != NOT_MAPPED]
        if self.source is None or any(c is None for c in counts):
            return None
        return max((abs(c - self.source) for c in counts if c is not None), default=0)

    def as_dict(self) -> dict[str, Any]:
        def shown(count: int | None) -> int | str | None:
            return "n/a" if count == NOT_MAPPED else count

        return {"entity": self.entity, "source": self.source,
                **{name: shown(c) for name, c in self.stores.items()}, "drift": self.drift}


def source_count(settings: Settings, pipeline: Pipeline, spec: EntitySpec) -> int:
    return count_rows(pipeline.source_dsn(settings), spec.source_schema, spec.source_table)


def _count(store: Store | None, spec: EntitySpec) -> int | None:
    if store is None:
        return None
    try:
        return store.count(spec)
    except Exception as exc:  # one unreachable store must not hide the others
        log.warning("event=drift_count_failed store=%s entity=%s error=%s", store.name, spec.name, exc)
        return None


def drift(settings: Settings, pipeline: Pipeline | None = None, entities: list[str] | None = None) -> list[DriftRow]:
    """PostgreSQL entities and the views computed from them (a MongoDB one only when asked for by name: its
    stores, no source count)."""
    if pipeline is None:

        pipeline = load(settings.pipeline)
    for e in entities or []:
        pipeline.entity(e)  # KeyError naming the pipeline's entities
    stores: dict[str, Store | None] = {}
    for name in used_by(pipeline):
        try:
            stores[name] = create(name, settings, pipeline)
        except Exception as exc:
            log.warning("event=store_unavailable store=%s error=%s", name, exc)
            stores[name] = None
    rows = []
    try:
        for name, spec in pipeline.entities.items():
            if entities and name not in entities:
                continue
            computed = spec.source == "view" and unsupported(pipeline, pipeline.views[name]) is None
            if spec.source != "postgres" and not computed and not entities:
                continue
            counts = {s: (_count(store, spec) if spec.stored_in(s) else NOT_MAPPED) for s, store in stores.items()}
            source = source_count(settings, pipeline, spec) if spec.source == "postgres" else None
            if computed:  # a view: its rows computed at the source now (reports.reconcile.views)
                source = Source(settings, pipeline).count(spec)
            rows.append(DriftRow(name, source, counts))
    finally:
        for store in stores.values():
            if store is not None:
                store.close()
    return rows


def drift_table(rows: list[DriftRow]) -> Table:
    """The drift rows as a table: one column per registered store."""
    store_names = list(dict.fromkeys(s for r in rows for s in r.stores)) or names()
    table = Table(title="drift: source rows vs derived stores")
    for col in ("entity", "source", *store_names, "drift"):
        table.add_column(col, justify="right" if col != "entity" else "left")

    def cell(v: int | None) -> str:
        return "unreachable" if v is None else ("n/a" if v == NOT_MAPPED else str(v))

    for r in rows:
        d = r.drift
        table.add_row(r.entity, "n/a" if r.source is None else str(r.source),
                      *(cell(r.stores.get(s, NOT_MAPPED)) for s in store_names),
                      "[red]?[/]" if d is None else (f"[green]{d}[/]" if d == 0 else f"[red]{d}[/]"))
    return table
