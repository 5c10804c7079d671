"""`changeflow bench`: changeflow against the consumers a user would otherwise write, on this machine, in one run."""

from __future__ import annotations

import json
import sys
import tempfile
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from changeflow import context
from changeflow.bench.common import BenchSettings
from changeflow.commands import args

console = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, soft_wrap=True)


class Format(StrEnum):
    table = "table"
    json = "json"


def _n(v: Any, unit: str = "") -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}{unit}" if isinstance(v, int | float) and abs(v) >= 10 else f"{v}{unit}"


def _print(result: dict[str, Any]) -> None:
    if result.get("views"):
        _print_views(result["views"])
    if result.get("views_live"):
        _print_views_live(result["views_live"])
    b = result.get("backlog", {})
    if b:
        per = b.get("per_sink_changes_per_s", {})
        t = Table(title=f"Backlog: {b['changes']:,} Debezium changes already in Kafka → decode → {' + '.join(per)} "
                        "(one worker)")
        for col in ("consumer", "changes/s", "x naive", "x ceiling", "how"):
            t.add_column(col, justify="left" if col in ("consumer", "how") else "right")
        t.add_row("changeflow worker", _n(result["throughput_changes_per_s"]), _n(result["ratio_vs_naive"]),
                  _n(result["ratio_vs_ceiling"]), f"Faust decode agent fed by a C consumer + {len(per)} sink processes")
        t.add_row("naive consumer", _n(b["naive_changes_per_s"]), "1", _n(_div(b["naive_changes_per_s"],
                  b["ceiling_changes_per_s"])), f"one at a time → Redis SET, sync commit ({b['naive_seconds']}s)")
        t.add_row("ceiling", _n(b["ceiling_changes_per_s"]), _n(_div(b["ceiling_changes_per_s"],
                  b["naive_changes_per_s"])), "1", "bare confluent-kafka consume + decode, no writes")
        console.print(t)
        s = Table(title="Backlog stages (changes/s)")
        for col in ("pass", "decode stage", *per):
            s.add_column(col, justify="right")
        s.add_row("worker", _n(b.get("decode_stage_changes_per_s")), *(_n(v) for v in per.values()))
        console.print(s)
        cpu = b.get("cpu_us_per_change") or {}
        if cpu:
            c = Table(title="Backlog: CPU µs per change, per process (/proc/<pid>/stat, ready → last commit)")
            for col in ("process", "µs/change", "x ceiling"):
                c.add_column(col, justify="left" if col == "process" else "right")
            ceiling_us = b.get("ceiling_cpu_us_per_change")
            for name, us in cpu.items():
                c.add_row(f"[bold]{name}[/]" if name == "changeflow" else name, f"{us:,.1f}", _n(_div(us, ceiling_us)))
            c.add_row("[dim]ceiling (consume + decode)[/]", _n(ceiling_us), "1")
            console.print(c)
    fresh = result.get("freshness", {})
    if fresh:
        t = Table(title="Freshness: ms from PostgreSQL commit to visible (live pipeline)")
        for col in ("load", "store", "p50", "p95", "p99", "unseen"):
            t.add_column(col, justify="right")
        for v in fresh.values():
            for store, q in v.items():
                if not isinstance(q, dict) or "p50" not in q:
                    continue
                t.add_row(f"{v['achieved_per_s']:,}/s", store, _n(q["p50"]), _n(q["p95"]), _n(q["p99"]),
                          str(q["unseen"]))
            st = v.get("stages", {})
            t.add_row("", "[dim]→ raw topic[/]", _n(st.get("commit_to_raw_topic", {}).get("p50")), "",
                      _n(st.get("commit_to_raw_topic", {}).get("p99")), "")
            t.add_row("", "[dim]→ canonical[/]", _n(st.get("commit_to_canonical_topic", {}).get("p50")), "",
                      _n(st.get("commit_to_canonical_topic", {}).get("p99")), "")
        console.print(t)
    snap = result.get("snapshot", {})
    if snap:
        t = Table(title=f"Snapshot of a {snap['rows']:,}-row table (new Debezium connector)")
        for col in ("store", "rows/s", "rows/s from first record"):
            t.add_column(col, justify="right")
        for store, v in (snap.get("per_store_rows_per_s") or {}).items():
            t.add_row(store, _n(v), _n((snap.get("per_store_rows_per_s_from_first_record") or {}).get(store)))
        t.add_row("[dim]Debezium → Kafka[/]", _n(snap.get("debezium_rows_per_s")), "")
        console.print(t)
    t = Table(title="Targets")
    for col in ("target", "goal", "measured", ""):
        t.add_column(col)
    for name, v in result["targets"].items():
        mark = "-" if v["met"] is None else ("[green]met[/]" if v["met"] else "[red]missed[/]")
        t.add_row(name, str(v["target"]), _n(v["measured"]), mark)
    console.print(t)
    m = result["machine"]
    console.print(f"machine: {m['cpus']} x {m['cpu_model']}, {m['memory_gb']} GB, Python {m['python']}, "
                  f"{m['date']}; run {result['run_id']} took {result['seconds']}s", highlight=False)


def _print_views(v: dict[str, Any]) -> None:
    t = Table(title=f"Views: {v['orders']:,} orders joined with {v['users']:,} users (\"orders of users in New "
                    "York\"), the view stage's engine on RocksDB in one process")
    for col in ("figure", "value", "how"):
        t.add_column(col, justify="right" if col == "value" else "left")
    t.add_row("records/s through the join", _n(v["apply_records_per_s"]),
              f"apply + recompute + commit every {2000:,}, outputs taken ({v['load_seconds']} s)")
    t.add_row("RSS with the state loaded", f"{v['rss_mb_with_state']} MB",
              f"VmRSS of this process ({v['rss_mb_before']} MB before); state on disk {v['state_disk_mb']} MB")
    t.add_row(f"fan-out of a user with {v['hot_user_orders']:,} orders", f"{v['hot_fanout_seconds']} s",
              f"{v['hot_fanout_rows']:,} view rows published; longest step {v['hot_fanout_longest_step_ms']} ms "
              f"({v['fanout_step']:,} referrers per step: what other keys wait at most)")
    console.print(t)


def _print_views_live(v: dict[str, Any]) -> None:
    t = Table(title="Views on the live stack: commerce's ny_orders (orders joined with users) beside orders, "
                    "to ClickHouse, in one run")
    for col in ("figure", "orders (entity)", "ny_orders (view)", "view / entity"):
        t.add_column(col, justify="left" if col == "figure" else "right")
    t.add_row(f"{v['backlog_orders']:,} orders at once: changes/s", _n(v.get("backlog_orders_changes_per_s")),
              _n(v.get("backlog_ny_orders_changes_per_s")), _n(v.get("backlog_view_vs_entity")))
    fe, fv = v.get("freshness_orders_ms") or {}, v.get("freshness_ny_orders_ms") or {}
    for q in ("p50", "p99"):
        t.add_row(f"{v['rate']:,}/s for {v['seconds']:.0f} s: freshness {q} (ms)", _n(fe.get(q)), _n(fv.get(q)),
                  _n(_div(fv.get(q), fe.get(q))))
    console.print(t)


def _div(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def bench(
    quick: Annotated[bool, typer.Option("--quick", help="Small sizes (20k changes, a 20k-row snapshot, 5 s per "
                                                        "load): about a minute here.")] = False,
    full: Annotated[bool, typer.Option("--full", help="1M changes and a 1M-row snapshot (about 10 minutes "
                                                      "here).")] = False,
    format: Annotated[Format, typer.Option("--format", help="table or json")] = Format.table,
    chart: Annotated[Path | None, typer.Option(help="PNG path (default bench-<date>.png here).")] = None,
    profile: Annotated[Path | None, typer.Option(help="Write a pyinstrument profile of the decode process here.")]
    = None,
    changes: Annotated[int | None, typer.Option(help="Backlog size (overrides the mode).")] = None,
    snapshot_rows: Annotated[int | None, typer.Option(help="Snapshot table size (overrides the mode).")] = None,
    freshness_seconds: Annotated[float | None, typer.Option(help="Seconds of each steady load.")] = None,
    rates: Annotated[str | None, typer.Option(help="Freshness loads, changes/s, comma-separated.")] = None,
    naive_seconds: Annotated[float | None, typer.Option(help="Time budget of the naive consumer.")] = None,
    stages: Annotated[str | None, typer.Option(help="Only these: backlog,snapshot,freshness,views,views-live "
                                                    "(the views are not in the default run).")] = None,
    clean_up: Annotated[str | None, typer.Option("--clean-up", help="Only remove what run RUN_ID left behind.")]
    = None,
) -> None:
    """Backlog throughput, freshness and snapshot speed, beside a naive consumer and the bare-loop ceiling."""
    # Kept here for start-up cost (changeflow/commands/__init__.py): chart ~940 ms (matplotlib), run ~400 ms,
    # pipeline ~100 ms; paid by `changeflow bench` only.
    from changeflow.bench import chart as chart_mod
    from changeflow.bench import run as run_mod
    from changeflow.bench.pipeline import BenchWorkerError

    settings = context.settings()
    if clean_up:
        from changeflow.bench.cleanup import cleanup  # ~300 ms at start-up: paid by --clean-up only

        print(json.dumps(cleanup(BenchSettings(**settings.model_dump()), clean_up, context.pipeline()), indent=2))
        return
    if quick and full:
        args.usage("choose --quick or --full")
    try:
        freshness_rates = tuple(int(r) for r in rates.split(",")) if rates else None
    except ValueError:
        args.usage(f"--rates {rates!r}: give changes/s as whole numbers, comma-separated (e.g. 1000,5000)")
    if freshness_rates is not None and min(freshness_rates) < 1:
        args.usage(f"--rates {rates!r}: every rate must be at least 1 change/s")
    plan = run_mod.plan_for(
        "quick" if quick else "full" if full else "default", changes=changes, snapshot_rows=snapshot_rows,
        freshness_s=freshness_seconds, naive_budget_s=naive_seconds,
        freshness_rates=freshness_rates,
        stages=tuple(s.strip() for s in stages.split(",")) if stages else None,
    )
    unknown = set(plan.stages) - set(run_mod.STAGES)
    if unknown:
        args.usage(f"unknown stages {', '.join(sorted(unknown))}; known: {', '.join(run_mod.STAGES)}")
    log_dir = Path(tempfile.mkdtemp(prefix="changeflow-bench-"))
    try:
        result = run_mod.run(settings, context.pipeline(), plan, log_dir, profile,
                             lambda m: err.print(m, highlight=False))
    except (BenchWorkerError, RuntimeError) as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        raise typer.Exit(1) from None
    path = chart or Path(f"bench-{datetime.now(UTC):%Y%m%d-%H%M%S}.png")
    # As the user named it (relative to where they ran it): recorded results never carry a machine's paths.
    result["chart"] = str(chart_mod.write(result, path))
    if profile is not None:
        result["profile_dir"] = str(profile)
    if format is Format.json:
        print(json.dumps(result, indent=2, default=str))
        return
    _print(result)
    console.print(f"chart: {result['chart']}", highlight=False)
