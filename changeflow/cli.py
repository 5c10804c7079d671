"""The `changeflow` command line: the one place that loads settings and wires the parts together."""

from __future__ import annotations

import json
import sys
import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from changeflow import context
from changeflow.commands import connectors as connectors_commands
from changeflow.commands import dlq as dlq_commands
from changeflow.commands import init as init_commands
from changeflow.commands import pipeline as pipeline_commands
from changeflow.commands import sinks as sinks_commands
from changeflow.commands.bench import bench as bench_command
from changeflow.commands.finance import report_finance
from changeflow.commands.rebuild import rebuild as rebuild_command
from changeflow.commands.reconcile import reconcile as reconcile_command
from changeflow.commands.watch import watch as watch_command
from changeflow.settings import Settings
from pipelines.load import PipelineError

app = typer.Typer(help="changeflow: change data capture from PostgreSQL and MongoDB into Redis, search and ClickHouse.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
stack_app = typer.Typer(help="The native local stack (no Docker).", no_args_is_help=True)
report_app = typer.Typer(help="Reports.", no_args_is_help=True)
@app.callback()
def main_options(
    pipeline_file: Annotated[Path | None, typer.Option(
        "--pipeline", envvar="CHANGEFLOW_PIPELINE",
        help="The pipeline file (default: the commerce example, examples/commerce/pipeline.yml).")] = None,
) -> None:
    """Every command works on one pipeline: `--pipeline FILE` or CHANGEFLOW_PIPELINE."""
    context.use_pipeline(pipeline_file)


app.add_typer(stack_app, name="stack")
app.add_typer(connectors_commands.app, name="connectors")
app.add_typer(pipeline_commands.app, name="pipeline")
app.add_typer(init_commands.app, name="init")
app.add_typer(report_app, name="report")
app.add_typer(dlq_commands.app, name="dlq")
app.add_typer(sinks_commands.app, name="sinks")
app.command("rebuild")(rebuild_command)
report_app.command("finance")(report_finance)
app.command("reconcile")(reconcile_command)
app.command("bench")(bench_command)
app.command("watch")(watch_command)

# Piped output (CI logs, tests) must not be cut at 80 columns.
console = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, soft_wrap=True)


class Format(StrEnum):
    table = "table"
    json = "json"


def settings() -> Settings:
    return context.settings()


def pipeline() -> Any:
    """The pipeline; an invalid file ends the command with its one-line error (exit 2)."""
    try:
        return context.pipeline()
    except PipelineError as exc:
        raise fail(str(exc), code=2) from None


def fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code)


# --- stack ------------------------------------------------------------------------------------------
@stack_app.command("up")
def stack_up(services: Annotated[list[str] | None, typer.Argument(help="Only these services.")] = None) -> None:
    """Install (first time) and start every service, waiting for each to be healthy."""
    from deploy import stack
    from deploy.service import ServiceError

    s = settings()
    try:
        stack.up(s, services, say=lambda m: console.print(m, highlight=False))
    except ServiceError as exc:
        raise fail(str(exc)) from None
    _print_status(s)


@stack_app.command("down")
def stack_down(services: Annotated[list[str] | None, typer.Argument(help="Only these services.")] = None) -> None:
    """Stop what `stack up` (and the demo's worker) started; data stays under the state directory."""
    from deploy import stack
    from deploy.worker import WorkerService

    s = settings()
    if (not services or "worker" in services) and WorkerService(s).stop():
        console.print("stopped worker")
    rest = [name for name in services or [] if name != "worker"]
    if services and not rest:
        return
    stack.down(s, rest or None, say=lambda m: console.print(m, highlight=False))


@stack_app.command("status")
def stack_status(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable.")] = False) -> None:
    """Each service's URL, pid and health."""
    s = settings()
    if as_json:
        from deploy import stack

        print(json.dumps(stack.status_dicts(s), indent=2))
        return
    _print_status(s)


def _print_status(s: Settings) -> None:
    from deploy import stack

    table = Table(title=f"changeflow stack ({s.state})")
    for col in ("service", "url", "health", "pid", "log"):
        table.add_column(col)
    for st in stack.status(s):
        health = "[green]healthy[/]" if st.healthy else ("[yellow]starting[/]" if st.running else "[red]down[/]")
        table.add_row(st.name, st.url, health, str(st.pid or "-"), st.log)
    console.print(table)


# --- worker -----------------------------------------------------------------------------------------
@app.command("worker")
def worker(
    sinks: Annotated[str | None, typer.Option(help="Comma-separated sinks to run (default: all).")] = None,
    loglevel: Annotated[str, typer.Option(help="Log level.")] = "info",
) -> None:
    """Run the stream processor (Faust) and one process per sink runner, in the foreground."""
    from changeflow import worker as worker_mod
    from sinks.base import names

    chosen = None
    if sinks is not None:
        chosen = [n.strip() for n in sinks.split(",") if n.strip()]
        unknown = [n for n in chosen if n not in names()]
        if not chosen or unknown:
            raise fail(f"--sinks {sinks!r}: unknown or empty; choose from {', '.join(names())}", code=2)
    worker_mod.run(settings(), pipeline(), chosen, loglevel=loglevel)


# --- status -----------------------------------------------------------------------------------------
@app.command("status")
def status(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable.")] = False) -> None:
    """Connectors and tasks, replication slot WAL, lag and health per sink, dead letters, applied-through."""
    from reports.status import collect

    st = collect(settings(), pipeline())
    if as_json:
        print(json.dumps(st.as_dict(), indent=2))
    else:
        for c in st.connectors:
            connectors_commands.print_connector(c)
        table = Table(title="replication slots")
        for col in ("slot", "active", "retained WAL (bytes)", "unconfirmed (bytes)"):
            table.add_column(col)
        for sl in st.slots:
            table.add_row(sl.name, str(sl.active), f"{sl.retained_wal_bytes:,}", f"{sl.confirmed_lag_bytes or 0:,}")
        console.print(table)
        table = Table(title=f"sinks (decode lag {st.stream_lag}, dead letters {st.dead_letters})")
        for col in ("sink", "state", "lag", "applied through", "last error"):
            table.add_column(col)
        for sk in st.sinks:
            state = "[yellow]worker down[/]" if sk.healthy is None else (
                "[green]ok[/]" if sk.healthy else "[red]failing[/]"
            )
            through = ", ".join(f"{e}={v}" for e, v in sorted(sk.applied_through.items()))
            table.add_row(sk.name, state, str(sk.lag), through, (sk.last_error or "")[:80])
        console.print(table)
        for e in st.errors:
            err.print(f"[red]{e}[/]")
    if not st.healthy:
        raise typer.Exit(1)


# --- reports ----------------------------------------------------------------------------------------
@report_app.command("drift")
def report_drift(
    format: Annotated[Format, typer.Option("--format", help="table or json")] = Format.table,
    entity: Annotated[list[str] | None, typer.Option(help="Only these entities.")] = None,
) -> None:
    """Per entity: rows in PostgreSQL against ClickHouse (FINAL), Redis and the search index."""
    from reports.drift import drift

    rows = drift(settings(), pipeline(), entity)
    _print_drift(rows, format)
    if any(r.drift != 0 for r in rows):
        raise typer.Exit(1)


def _print_drift(rows: list[Any], format: Format) -> None:
    from reports.drift import NOT_MAPPED
    if format is Format.json:
        print(json.dumps([r.as_dict() for r in rows], indent=2))
        return
    table = Table(title="drift: source rows vs derived stores")
    for col in ("entity", "postgres", "clickhouse", "redis", "search", "drift"):
        table.add_column(col, justify="right" if col != "entity" else "left")

    def cell(v: int | None) -> str:
        return "unreachable" if v is None else ("n/a" if v == NOT_MAPPED else str(v))

    for r in rows:
        d = r.drift
        table.add_row(r.entity, cell(r.source), cell(r.clickhouse), cell(r.redis), cell(r.search),
                      "[red]?[/]" if d is None else (f"[green]{d}[/]" if d == 0 else f"[red]{d}[/]"))
    console.print(table)


# --- demo -------------------------------------------------------------------------------------------
@app.command("demo")
def demo(
    products: Annotated[int, typer.Option(help="Products to insert.")] = 200,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the stores to catch up.")] = 180.0,
) -> None:
    """Everything end to end: stack, connector, worker, a workload, stores catching up, drift report."""
    from deploy.service import ServiceError
    from deploy.worker import WorkerService
    from deploy.workload import run_products
    from reports.drift import drift

    s = settings()
    stack_up(None)
    connectors_commands.apply(None)
    worker_service = WorkerService(s)
    if not worker_service.running():
        console.print(f"starting worker (log {worker_service.log_file})")
        worker_service.start()
    try:
        worker_service.wait_healthy(120)
    except ServiceError as exc:
        raise fail(str(exc)) from None
    console.print(f"worker running at {worker_service.url}")

    updates, deletes = max(1, products * 2 // 5), max(1, products // 8)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console) as progress:
        tasks = {
            "insert": progress.add_task("insert products", total=products),
            "update": progress.add_task("update prices", total=updates),
            "delete": progress.add_task("delete products", total=deletes),
        }
        result = run_products(s.pg_dsn, products, updates, deletes,
                              progress=lambda step, n: progress.advance(tasks[step], n))
    console.print(f"workload: {result.inserted} inserted, {result.updated} updated, {result.deleted} deleted")

    started = time.monotonic()
    deadline = started + timeout
    console.print("derived stores catching up (products: PostgreSQL / ClickHouse / Redis / search):")
    while True:
        rows = drift(s, pipeline(), ["products"])
        p = rows[0]
        console.print(f"  +{time.monotonic() - started:4.1f}s  {p.source} / {p.clickhouse} / {p.redis} / {p.search}",
                      highlight=False)
        if p.drift == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    rows = drift(s, pipeline())
    _print_drift(rows, Format.table)
    if any(r.drift != 0 for r in rows):
        raise fail(f"stores did not converge within {timeout:.0f}s; see {worker_service.log_file}")
    console.print("[green]zero drift[/]: every derived store matches PostgreSQL. "
                  "Stop everything with `changeflow stack down`.")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
