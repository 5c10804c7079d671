"""One benchmark run: plan, stages, headline figures against the issue's targets, clean-up."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from changeflow.bench import backlog, freshness, snapshot, views
from changeflow.bench.cleanup import cleanup, freshness_sku_prefix
from changeflow.bench.common import BenchSettings, machine, new_run_id
from changeflow.pipelines.spec import Pipeline
from changeflow.settings import Settings
from changeflow.sinks.base import registry

Say = Callable[[str], None]
STAGES = ("backlog", "snapshot", "freshness", "views", "views-live")
DEFAULT_STAGES = ("backlog", "snapshot", "freshness")


@dataclass(frozen=True)
class Plan:
    mode: str
    changes: int
    naive_budget_s: float
    freshness_rates: tuple[int, ...]
    freshness_s: float
    drain_timeout_s: float
    snapshot_rows: int
    view_orders: int = 1_000_000
    view_hot: int = 100_000
    stages: tuple[str, ...] = field(default=DEFAULT_STAGES)


PLANS = {
    "quick": Plan("quick", 20_000, 5, (1000, 5000), 5, 20, 20_000, view_orders=100_000, view_hot=10_000),
    "default": Plan("default", 100_000, 10, (1000, 5000), 15, 60, 100_000),
    "full": Plan("full", 1_000_000, 20, (1000, 5000), 30, 120, 1_000_000),
}

TARGETS = {
    "throughput_changes_per_s": 20_000,
    "ratio_vs_naive": 20,
    "ratio_vs_ceiling": 0.6,
    "freshness_p99_ms_at_1000_per_s": 250,
    "freshness_p99_ms_at_5000_per_s": 1000,
}


def store_targets() -> dict[str, int]:
    """``snapshot_rows_per_s_<store>``: a store's own snapshot target (``snapshot_target_rows_per_s`` on its
    class), for each registered store that sets one."""
    return {f"snapshot_rows_per_s_{name}": int(getattr(cls, "snapshot_target_rows_per_s", 0))
            for name, cls in registry().items() if getattr(cls, "snapshot_target_rows_per_s", None)}


def plan_for(mode: str, **overrides: Any) -> Plan:
    return replace(PLANS[mode], **{k: v for k, v in overrides.items() if v is not None})


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def run(settings: Settings, pipeline: Pipeline, plan: Plan, log_dir: Path, profile_dir: Path | None,
        say: Say) -> dict[str, Any]:
    # The bench workers load the same pipeline file (then rename it per stage: bench.common.Isolation.pipeline).
    base = BenchSettings(**{**settings.model_dump(), "pipeline": pipeline.path})

    def on_sigterm(*_: object) -> None:
        raise SystemExit(143)  # unwind through the clean-up below

    signal.signal(signal.SIGTERM, on_sigterm)
    run_id = new_run_id()
    started = time.monotonic()
    out: dict[str, Any] = {"run_id": run_id, "mode": plan.mode, "plan": asdict(plan), "machine": machine()}
    say(f"bench run {run_id} ({plan.mode}); worker logs in {log_dir}")
    try:
        if "backlog" in plan.stages:
            out["backlog"] = backlog.run(base, pipeline, run_id, plan.changes, plan.naive_budget_s, log_dir,
                                         profile_dir, say)
        if "snapshot" in plan.stages:
            out["snapshot"] = snapshot.run(base, pipeline, run_id, plan.snapshot_rows, log_dir, say)
        if "views" in plan.stages:
            say(f"views: {plan.view_orders:,} orders through a two-way join, a user with {plan.view_hot:,} moving")
            out["views"] = views.run_views(plan.view_orders, plan.view_hot)
        if "views-live" in plan.stages:
            out["views_live"] = views.run_views_live(settings, pipeline, backlog=min(plan.changes, 20_000),
                                                     rate=1000, seconds=plan.freshness_s, say=say)
        if "freshness" in plan.stages:
            out["freshness"] = freshness.run(settings, pipeline, freshness_sku_prefix(run_id),
                                             list(plan.freshness_rates), plan.freshness_s, plan.drain_timeout_s, say)
    finally:
        say("cleaning up bench topics, groups, connector, slot, database, indexes, tables and keys")
        out["cleanup"] = cleanup(base, run_id, pipeline)
    out["seconds"] = round(time.monotonic() - started, 1)
    headline(out)
    return out


def headline(out: dict[str, Any]) -> None:
    """The flat keys of the issue, and each target with its measured figure."""
    b = out.get("backlog", {})
    out["throughput_changes_per_s"] = b.get("throughput_changes_per_s")
    out["naive_changes_per_s"] = b.get("naive_changes_per_s")
    out["ceiling_changes_per_s"] = b.get("ceiling_changes_per_s")
    out["ratio_vs_naive"] = _ratio(out["throughput_changes_per_s"], out["naive_changes_per_s"])
    out["ratio_vs_ceiling"] = _ratio(out["throughput_changes_per_s"], out["ceiling_changes_per_s"])
    out["cpu_us_per_change"] = b.get("cpu_us_per_change", {})
    out["ceiling_cpu_us_per_change"] = b.get("ceiling_cpu_us_per_change")
    fresh = out.get("freshness", {})
    out["freshness_ms"] = {
        load: {s: {q: v[s][q] for q in ("p50", "p95", "p99")} for s, per in v.items()
               if isinstance(per, dict) and "p99" in per}
        for load, v in fresh.items()
    }
    snap = out.get("snapshot", {})
    out["snapshot_rows_per_s"] = snap.get("all_stores_rows_per_s")
    out["snapshot_rows_per_s_by_store"] = snap.get("per_store_rows_per_s")

    def p99(load: str) -> float | None:
        stores = out["freshness_ms"].get(load)
        return max(v["p99"] for v in stores.values() if v["p99"] is not None) if stores else None

    measured = {
        "throughput_changes_per_s": out["throughput_changes_per_s"],
        "ratio_vs_naive": out["ratio_vs_naive"],
        "ratio_vs_ceiling": out["ratio_vs_ceiling"],
        "freshness_p99_ms_at_1000_per_s": p99("1000_per_s"),
        "freshness_p99_ms_at_5000_per_s": p99("5000_per_s"),
        **{name: (out["snapshot_rows_per_s_by_store"] or {}).get(name.removeprefix("snapshot_rows_per_s_"))
           for name in store_targets()},
    }
    lower_is_better = {"freshness_p99_ms_at_1000_per_s", "freshness_p99_ms_at_5000_per_s"}
    out["targets"] = {
        name: {"target": target, "measured": measured[name],
               "met": None if measured[name] is None else (
                   measured[name] < target if name in lower_is_better else measured[name] >= target)}
        for name, target in {**TARGETS, **store_targets()}.items()
    }
