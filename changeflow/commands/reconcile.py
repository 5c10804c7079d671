"""`changeflow reconcile`: key-level drift between the source and every derived store, with repair."""

from __future__ import annotations

import json
import sys
from enum import StrEnum
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from changeflow import context
from changeflow.commands import args
from changeflow.pipelines.spec import Pipeline
from changeflow.reports import home
from changeflow.settings import Settings

console = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, soft_wrap=True)
SHOWN_DIFFS = 20


class Format(StrEnum):
    table = "table"
    json = "json"


def reconcile(
    entity: Annotated[list[str] | None, typer.Option("--entity", help="Only this entity (repeatable).")] = None,
    store: Annotated[list[str] | None, typer.Option("--store", help="A registered store; repeatable.")] = None,
    sample: Annotated[int | None, typer.Option("--sample", min=1, help="Compare N random source keys.")] = None,
    full: Annotated[bool, typer.Option("--full", help="Compare every key (the default).")] = False,
    key: Annotated[list[str] | None, typer.Option("--key", help="Only this key (repeatable; strays too).")] = None,
    max_drift: Annotated[int, typer.Option("--max-drift", min=0, help="Drifted keys tolerated per store.")] = 0,
    format: Annotated[Format, typer.Option("--format", help="table or json")] = Format.table,
    do_repair: Annotated[bool, typer.Option("--repair", help="Re-sync the drifted keys, then check again.")] = False,
    settle: Annotated[float, typer.Option(min=0, help="Seconds before differing keys are read again (changes in "
                                                     "flight settle).")] = 2.0,
    timeout: Annotated[float, typer.Option(min=0, help="Seconds --repair waits for the stores.")] = 120.0,
) -> None:
    """Source (PostgreSQL) against every registered store holding the entity: counts, missing keys on either
    side, stale and mismatched content, by bucketed checksums. Each run lands in the pipeline's ClickHouse
    database (reconciliation_runs, reconciliation_diffs).

    Exit codes: 0 no store drifts by more than --max-drift (after --repair: once repaired); 1 one does; 2 usage
    (an unknown entity or store, an entity none of the given stores holds)."""
    # Kept here for start-up cost (changeflow/commands/__init__.py): changeflow.reports.reconcile ~190 ms.
    from changeflow.reports.reconcile import reconcile as run_reconcile
    from changeflow.reports.reconcile import repair

    if sum((sample is not None, full, bool(key))) > 1:
        args.usage("--sample, --full and --key exclude each other")
    settings, pipeline = context.settings(), args.pipeline()
    args.entities(pipeline, entity)
    args.stores(store)
    args.stored(pipeline, entity, store)
    try:
        run = run_reconcile(settings, pipeline, entity, store, sample, settle, only_keys=key)
    except ValueError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(2) from None
    _record(settings, pipeline, run)
    output: dict[str, Any] = run.as_dict()
    final = run
    if do_repair:
        if format is Format.table:
            _print_run(run, "before repair")
        total = sum(r.drift for r in run.results)
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeElapsedColumn(), console=err, transient=False, disable=total == 0) as progress:
            task = progress.add_task("stores re-synced", total=max(total, 1))
            report = repair(settings, pipeline, run, timeout,
                            lambda done, n: progress.update(task, completed=done, total=n))
        final = run_reconcile(settings, pipeline, entity, store, sample, settle, repair_of=run.run_id, only_keys=key)
        _record(settings, pipeline, final)
        output = {**output, "repair": report.as_dict(), "after_repair": final.as_dict()}
        if format is Format.table:
            _print_repair(report.as_dict())
            _print_run(final, "after repair")
    elif format is Format.table:
        _print_run(run, "")
    if format is Format.json:
        print(json.dumps(output, indent=2, default=str))
    if final.drift_exceeds(max_drift):
        raise typer.Exit(1)


def _record(settings: Settings, pipeline: Pipeline, run: Any) -> None:
    """History is kept in ClickHouse; when it is down the run is still reported (and ClickHouse drift shows)."""
    # Kept here for start-up cost (changeflow/commands/__init__.py): changeflow.reports.reconcile ~190 ms.
    from changeflow.reports.reconcile import record_run

    try:
        record_run(settings, pipeline, run)
    except Exception as exc:
        err.print(f"[yellow]warning:[/] run {run.run_id} not recorded in ClickHouse: {exc}", highlight=False)


def _print_run(run: Any, label: str, database: str = "") -> None:
    title = f"reconcile {run.mode} run {run.run_id}" + (f" ({label})" if label else "")
    table = Table(title=title)
    for col in ("entity", "store", "source", "store rows", "missing in store", "missing in source", "stale",
                "mismatched", "buckets differing"):
        table.add_column(col, justify="left" if col in ("entity", "store") else "right")
    for r in run.results:
        d = r.as_dict()
        if r.error:
            table.add_row(r.entity, r.store, str(r.source_count), f"[red]{r.error[:60]}[/]", "", "", "", "", "")
            continue

        def n(v: int) -> str:
            return f"[red]{v}[/]" if v else "[green]0[/]"

        table.add_row(r.entity, r.store, str(r.source_count), str(r.store_count), n(d["missing_in_store"]),
                      n(d["missing_in_source"]), n(d["stale"]), n(d["mismatched"]),
                      f"{d['differing_buckets']}/{d['buckets']}")
    console.print(table)
    for name, reason in run.skipped.items():
        console.print(f"skipped {name}: {reason}", highlight=False)
    diffs = [(r.entity, r.store, d) for r in run.results for d in r.diffs]
    if diffs:
        table = Table(title=f"differing keys ({len(diffs)}; all in {database or home.database(context.pipeline())}"
                                 ".reconciliation_diffs)")
        for col in ("entity", "store", "key", "kind", "detail"):
            table.add_column(col)
        for entity, store, d in diffs[:SHOWN_DIFFS]:
            table.add_row(entity, store, d.key, d.kind, d.detail[:120])
        console.print(table)


def _print_repair(report: dict[str, Any]) -> None:
    for where, keys in report["deleted_strays"].items():
        console.print(f"deleted {len(keys)} stray keys from {where} (not in the source, so no snapshot can "
                      f"remove them): {', '.join(keys[:10])}", highlight=False)
    for entity, n in report["snapshot_keys"].items():
        console.print(f"incremental snapshot of {n} {entity} keys requested", highlight=False)
    console.print(f"converged {report['converged']} store keys in {report['seconds']}s", highlight=False)
    for p in report["pending"][:SHOWN_DIFFS]:
        err.print(f"[yellow]not converged:[/] {p}", highlight=False)
    for e in report["errors"]:
        err.print(f"[red]{e}[/]", highlight=False)
