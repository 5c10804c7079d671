"""Repair: strays deleted from their store, every other drifted key re-read from the source by an
incremental snapshot limited to those keys (signals in the pipeline's signal table, in chunks that fit)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from changeflow.pipelines.spec import Pipeline
from changeflow.reports.reconcile.normalise import fold_empty
from changeflow.reports.reconcile.result import Run
from changeflow.reports.reconcile.run import canonical_types, comparable, null_is_empty, open_stores
from changeflow.reports.reconcile.source import Source
from changeflow.sinks.reread import send_signals
from changeflow.waiting import WaitTimeout, wait_until

if TYPE_CHECKING:
    from changeflow.settings import Settings



@dataclass
class RepairPlan:
    """What a repair does: per entity the keys to re-read from the source, per store the strays."""

    snapshot: dict[str, list[str]] = field(default_factory=dict)  # entity → keys
    strays: dict[tuple[str, str], list[str]] = field(default_factory=dict)  # (entity, store) → keys
    pairs: set[tuple[str, str, str]] = field(default_factory=set)  # (entity, store, key) to converge

    @property
    def empty(self) -> bool:
        return not self.snapshot and not self.strays


def plan_repair(run: Run) -> RepairPlan:
    plan = RepairPlan()
    for r in run.results:
        for d in r.diffs:
            if d.kind == "extra":
                plan.strays.setdefault((r.entity, r.store), []).append(d.key)
            else:
                keys = plan.snapshot.setdefault(r.entity, [])
                if d.key not in keys:
                    keys.append(d.key)
                plan.pairs.add((r.entity, r.store, d.key))
    return plan


@dataclass
class RepairReport:
    signals: list[str] = field(default_factory=list)
    snapshot_keys: dict[str, int] = field(default_factory=dict)
    deleted_strays: dict[str, list[str]] = field(default_factory=dict)  # "entity/store" → keys
    dropped_future_versions: list[str] = field(default_factory=list)
    converged: int = 0
    pending: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "signals": self.signals, "snapshot_keys": self.snapshot_keys, "deleted_strays": self.deleted_strays,
            "dropped_future_versions": self.dropped_future_versions, "converged": self.converged,
            "pending": self.pending, "errors": self.errors, "seconds": round(self.seconds, 2),
        }


def repair(
    settings: Settings,
    pipeline: Pipeline,
    run: Run,
    timeout_s: float = 120.0,
    progress: Callable[[int, int], None] | None = None,
) -> RepairReport:
    """Re-sync only the drifted keys: strays deleted from their store (the source has nothing to send for
    them), everything else re-read from the source by an incremental snapshot limited to those keys.

    A snapshot read carries the stream position at read time as its version, newer than anything the
    stores hold for a key, so the version guards let it through. A version *beyond* the source position
    (a bogus write) would outrank it: such versions are dropped first where the store allows it.
    """
    started = time.monotonic()
    report = RepairReport()
    plan = plan_repair(run)
    types, key_cols = canonical_types(settings, pipeline)
    source = Source(settings, pipeline, types, key_cols)
    stores = open_stores(settings, pipeline, {s for (_, s, _) in plan.pairs} | {s for (_, s) in plan.strays})
    try:
        for (entity, store_name), keys in plan.strays.items():
            spec = pipeline.entity(entity)
            present = source.fetch(spec, keys)
            still_absent = [k for k in keys if k not in present]  # never delete what the source has
            stores[store_name].delete(spec, still_absent)
            report.deleted_strays[f"{entity}/{store_name}"] = still_absent
        position = source.position()
        for entity, keys in plan.snapshot.items():
            spec = pipeline.entity(entity)
            for store_name in {s for (e, s, _) in plan.pairs if e == entity}:
                try:
                    for key in stores[store_name].drop_versions_above(spec, keys, position):
                        report.dropped_future_versions.append(f"{entity}/{store_name}/{key}")
                except Exception as exc:  # e.g. the search store's UnrepairableError: reported, not fatal
                    report.errors.append(str(exc))
            report.signals += send_signals(settings, pipeline, spec, source.key_columns(spec), keys,
                                           source.key_is_numeric(spec))
            report.snapshot_keys[entity] = len(keys)

        total = len(plan.pairs)
        remaining = set(plan.pairs)

        def converged() -> bool:
            for entity in sorted({e for (e, _, _) in remaining}):
                spec = pipeline.entity(entity)
                keys = sorted({k for (e, _, k) in remaining if e == entity})
                src = source.fetch(spec, keys)
                for store_name in sorted({s for (e, s, _) in remaining if e == entity}):
                    held = comparable(stores[store_name], spec, source, keys)
                    held_types, kinds = source.types(spec), null_is_empty(stores[store_name])
                    for key in keys:
                        pair = (entity, store_name, key)
                        if (pair in remaining and key in src and key in held
                                and held[key][0] == fold_empty(src[key], held_types, kinds)):
                            remaining.discard(pair)
                        elif pair in remaining and key not in src and key not in held:
                            remaining.discard(pair)  # deleted in the source meanwhile, and gone from the store
            if progress:
                progress(total - len(remaining), total)
            return not remaining

        with contextlib.suppress(WaitTimeout):  # what did not converge in time is reported as pending
            if remaining:
                wait_until(converged, timeout_s, what="the repaired keys converged")
        report.converged = total - len(remaining)
        report.pending = [f"{e}/{s}/{k}" for (e, s, k) in sorted(remaining)]
    finally:
        for store in stores.values():
            store.close()
    report.seconds = time.monotonic() - started
    return report
