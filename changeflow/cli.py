"""The `changeflow` command line: the one place that loads settings and wires the parts together."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from confluent_kafka import KafkaException
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from changeflow import context
from changeflow.commands import args
from changeflow.commands import connectors as connectors_commands
from changeflow.commands import dlq as dlq_commands
from changeflow.commands import erasure as erasure_commands
from changeflow.commands import init as init_commands
from changeflow.commands import outbox as outbox_commands
from changeflow.commands import pipeline as pipeline_commands
from changeflow.commands import sinks as sinks_commands
from changeflow.commands import views as views_commands
from changeflow.commands.bench import bench as bench_command
from changeflow.commands.finance import _print_tables as print_finance
from changeflow.commands.finance import report_finance
from changeflow.commands.rebuild import rebuild as rebuild_command
from changeflow.commands.reconcile import _print_run as print_reconcile
from changeflow.commands.reconcile import reconcile as reconcile_command
from changeflow.commands.watch import watch as watch_command
from changeflow.deploy.service import ServiceError
from changeflow.deploy.worker import WorkerService
from changeflow.reports import objects as report_objects
from changeflow.reports.finance import GRACE_SECONDS, finance
from changeflow.settings import Settings
from changeflow.sinks.base import create, used_by
from changeflow.waiting import WaitTimeout, wait_until

# An import inside a command below stays there for the start-up cost noted beside it: what importing the module
# adds after changeflow.cli's own imports (python -X importtime / perf_counter, median of 5 cold runs, 2-core dev
# box); every cheaper import is at the top.

try:  # typer vendors click since 0.20; before, it used click itself
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover
    from click import exceptions as click_errors  # type: ignore[no-redef]


class _OneLineErrors(typer.Typer):
    """`changeflow` as a program: click's usage errors (an unknown option, a malformed value) as one line,
    ``error: <message> (see <command> --help)``, with exit code 2, like every other usage error."""

    def __call__(self, *a: Any, **kw: Any) -> Any:
        if kw.get("standalone_mode", True) is False:
            return super().__call__(*a, **kw)
        kw.setdefault("prog_name", "changeflow")  # `python -m changeflow` too
        try:
            code = super().__call__(*a, **{**kw, "standalone_mode": False})
        except click_errors.NoArgsIsHelpError as exc:  # `changeflow stack`: typer has printed its help
            sys.exit(exc.exit_code)
        except click_errors.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx is not None else "changeflow"
            args.say_error(f"{exc.format_message()} (see {where} --help)")
            sys.exit(exc.exit_code)
        except typer.Abort:
            args.say_error("aborted")
            sys.exit(1)
        except click_errors.ClickException as exc:
            args.say_error(exc.format_message())
            sys.exit(exc.exit_code)
        sys.exit(code if isinstance(code, int) else 0)


app = _OneLineErrors(
    help="changeflow: change data capture from PostgreSQL and MongoDB into Redis, search and ClickHouse.",
    no_args_is_help=True, pretty_exceptions_enable=False)
stack_app = typer.Typer(help="The native local stack (no Docker).", no_args_is_help=True)
report_app = typer.Typer(help="Reports.", no_args_is_help=True)
@app.callback()
def main_options(
    ctx: typer.Context,
    pipeline_file: Annotated[Path | None, typer.Option(
        "--pipeline", envvar="CHANGEFLOW_PIPELINE",
        help="The pipeline file (default: the commerce example, examples/commerce/pipeline.yml).")] = None,
) -> None:
    """Every command works on one pipeline: `--pipeline FILE` or CHANGEFLOW_PIPELINE."""
    if ctx.invoked_subcommand == "init":
        # `init` writes a pipeline file and never reads one: CHANGEFLOW_PIPELINE may name the file it is
        # about to write (README sets the variable once for the shell, then runs init).
        context.use_pipeline(None)
        return
    context.use_pipeline(args.existing_file(pipeline_file, "pipeline file") if pipeline_file else None)


app.add_typer(stack_app, name="stack")
app.add_typer(connectors_commands.app, name="connectors")
app.add_typer(pipeline_commands.app, name="pipeline")
app.add_typer(init_commands.app, name="init")
app.add_typer(report_app, name="report")
app.add_typer(dlq_commands.app, name="dlq")
app.add_typer(sinks_commands.app, name="sinks")
app.add_typer(views_commands.app, name="views")
app.add_typer(outbox_commands.events_app, name="events")
app.add_typer(outbox_commands.outbox_app, name="outbox")
app.add_typer(erasure_commands.app, name="erasure")
app.command("erase")(erasure_commands.erase)
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
    return args.pipeline()


fail = args.fail


def _services(names: list[str] | None, worker: bool) -> list[str] | None:
    """Service names as given, every one known (exit 2 otherwise)."""
    from changeflow.deploy import stack  # ~170 ms at start-up: kept here

    known = [s.name for s in stack.all_services(settings())] + (["worker"] if worker else [])
    for name in names or []:
        if name not in known:
            args.usage(f"unknown service {name!r}; the stack has: {', '.join(known)}")
    return names


# --- stack ------------------------------------------------------------------------------------------
@stack_app.command("up")
def stack_up(services: Annotated[list[str] | None, typer.Argument(help="Only these services.")] = None) -> None:
    """Install (first time) and start every service, waiting for each to be healthy."""
    from changeflow.deploy import stack  # ~170 ms at start-up: kept here

    s = settings()
    _services(services, worker=False)
    try:
        stack.up(s, services, say=lambda m: console.print(m, highlight=False))
    except ServiceError as exc:
        raise fail(str(exc)) from None
    _print_status(s)


@stack_app.command("down")
def stack_down(services: Annotated[list[str] | None, typer.Argument(help="Only these services.")] = None) -> None:
    """Stop what `stack up` (and the demo's worker) started; data stays under the state directory."""
    from changeflow.deploy import stack  # ~170 ms at start-up: kept here

    s = settings()
    _services(services, worker=True)
    worker_service = WorkerService(s)
    if not services or "worker" in services:
        if worker_service.stop():
            console.print("stopped worker")
        elif worker_service.healthy():
            err.print(f"[yellow]warning:[/] the worker on port {s.worker_web_port} was not started by changeflow; "
                      f"stop it with {worker_service.stop_hint()}", highlight=False)
    rest = [name for name in services or [] if name != "worker"]
    if services and not rest:
        return
    stack.down(s, rest or None, say=lambda m: console.print(m, highlight=False))


@stack_app.command("status")
def stack_status(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable.")] = False) -> None:
    """Each service's URL, pid and health, and the worker answering on the web port (whoever started it)."""
    s = settings()
    if as_json:
        from changeflow.deploy import stack  # ~170 ms at start-up: kept here

        print(json.dumps(stack.status_dicts(s), indent=2))
        return
    _print_status(s)


def _print_status(s: Settings) -> None:
    from changeflow.deploy import stack  # ~170 ms at start-up: kept here

    table = Table(title=f"changeflow stack ({s.state})")
    for col in ("service", "url", "health", "pid", "log"):
        table.add_column(col)
    for st in stack.status(s):
        health = "[green]healthy[/]" if st.healthy else ("[yellow]starting[/]" if st.running else "[red]down[/]")
        table.add_row(st.name, st.url, health, str(st.pid or "-"), st.detail or st.log)
    console.print(table)


# --- worker -----------------------------------------------------------------------------------------
class LogLevel(StrEnum):
    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


@app.command("worker")
def worker(
    sinks: Annotated[str | None, typer.Option(
        help="Comma-separated stores to run a sink for, e.g. redis,search (default: every registered one).")] = None,
    loglevel: Annotated[LogLevel, typer.Option(help="Log level.", case_sensitive=False)] = LogLevel.info,
) -> None:
    """Run the stream processor (Faust) and one process per sink, in the foreground, until Ctrl-C.

    Exit codes: 0 stopped by Ctrl-C or SIGTERM; 1 the worker failed (e.g. Kafka unreachable); 2 usage;
    3 a sink stopped on a fatal store error (`changeflow status` shows it); 4 the same again on the same
    batch: a crash loop (restarting will not help)."""
    from changeflow import worker as worker_mod  # ~150 ms at start-up: kept here

    # ~180 ms at start-up (psycopg, the stores; python -X importtime): paid by the worker only.
    from changeflow.erasure import api as erasure_api

    chosen = args.store_list(sinks) if sinks is not None else None
    s, p = settings(), pipeline()
    try:
        # The report views exist as soon as the sink of the store they live in has set up (README "Reports").
        code = worker_mod.run(s, p, chosen, loglevel=loglevel.value, after_setup=report_objects.ensure,
                              erasure=erasure_api.handler(s, p))
    except KafkaException as exc:
        raise fail(f"kafka at {s.kafka_bootstrap}: {exc.args[0] if exc.args else exc}",
                   worker_mod.EXIT_FAILED) from None
    if code:
        raise typer.Exit(code)


# --- status -----------------------------------------------------------------------------------------
@app.command("status")
def status(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable.")] = False) -> None:
    """Connectors and tasks, replication slot WAL, lag and health per sink, dead letters, applied-through; a
    sink that stopped the worker (its error and the batch it stopped on) or is crash-looping.

    Exit code 0 when everything is healthy, else 1."""
    from changeflow.reports.status import collect  # ~140 ms at start-up: kept here

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
        for col in ("sink", "state", "lag", "applied through", "quarantined", "last error"):
            table.add_column(col)
        for sk in st.sinks:
            if sk.crash_loop:
                state = "[red]crash-looping[/]"
            elif sk.stopped is not None:
                state = "[red]stopped the worker[/]"
            elif sk.healthy is None:
                state = "[yellow]worker down[/]"
            elif not sk.running:
                state = "[yellow]not run by this worker[/]"
            else:
                state = "[green]ok[/]" if sk.healthy else "[red]failing[/]"
            through = ", ".join(f"{e}={v}" for e, v in sorted(sk.applied_through.items()))
            held = ", ".join(f"{e}={n}" for e, n in sk.quarantined.items()) or "0"
            table.add_row(sk.name, state, str(sk.lag), through, held, (sk.last_error or "")[:80])
        console.print(table)
        for t in st.not_captured:
            console.print(f"[yellow]not captured:[/] {escape(t)} (no entity maps it: its changes are not read)",
                          highlight=False)
        for e in st.errors:
            err.print(f"[red]{escape(e)}[/]", highlight=False)
    if not st.healthy:
        raise typer.Exit(1)


# --- reports ----------------------------------------------------------------------------------------
@report_app.command("drift")
def report_drift(
    format: Annotated[Format, typer.Option("--format", help="table or json")] = Format.table,
    entity: Annotated[list[str] | None, typer.Option(help="Only this entity (repeatable).")] = None,
) -> None:
    """Per entity: rows in PostgreSQL against ClickHouse (FINAL), Redis and the search index.

    Exit code 0 without drift, 1 when an entity drifts (or a store cannot answer), 2 for usage errors."""
    from changeflow.reports.drift import drift  # ~110 ms at start-up: kept here

    p = pipeline()
    rows = drift(settings(), p, args.entities(p, entity))
    _print_drift(rows, format)
    if any(r.drift != 0 for r in rows):
        raise typer.Exit(1)


def _print_drift(rows: list[Any], format: Format) -> None:
    from changeflow.reports.drift import drift_table  # ~110 ms at start-up: kept here

    if format is Format.json:
        print(json.dumps([r.as_dict() for r in rows], indent=2))
        return
    console.print(drift_table(rows))  # one column per store the pipeline uses


# --- demo -------------------------------------------------------------------------------------------
@app.command("demo")
def demo(
    products: Annotated[int, typer.Option(help="Products to insert.")] = 200,
    orders: Annotated[int, typer.Option(help="Paid orders to write (each with its payment).")] = 40,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the stores to catch up.")] = 180.0,
) -> None:
    """Everything end to end: stack, connector, worker, a workload (products; orders, payments and refunds with
    four planted finance exceptions), the stores catching up, then drift, the finance report and reconcile."""
    from changeflow.deploy.workload import run_orders, run_products  # ~80 ms at start-up: kept here
    from changeflow.reports.drift import drift  # ~110 ms at start-up: kept here
    from changeflow.reports.reconcile import reconcile as run_reconcile  # ~120 ms at start-up: kept here

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
            "orders": progress.add_task("orders paid", total=orders),
            "exceptions": progress.add_task("finance exceptions planted", total=4),
        }
        result = run_products(s.pg_dsn, products, updates, deletes,
                              progress=lambda step, n: progress.advance(tasks[step], n))
        shop = run_orders(s.pg_dsn, orders, progress=lambda step, n: progress.advance(tasks[step], n))
    console.print(f"workload: {result.inserted} products inserted, {result.updated} updated, {result.deleted} deleted; "
                  f"{shop.orders} orders, {shop.payments} payments, {shop.refunds} refunds")

    started = time.monotonic()
    names: list[str] = []

    def products_caught_up() -> bool:
        p = drift(s, pipeline(), ["products"])[0]
        if not names:  # the columns: the source, then each registered store
            names.extend(p.stores)
            console.print(f"derived stores catching up (products: PostgreSQL / {' / '.join(names)}):")
        console.print(f"  +{time.monotonic() - started:4.1f}s  {p.source} / "
                      + " / ".join(str(c) for c in p.stores.values()), highlight=False)
        return p.drift == 0

    rows: list[Any] = []

    def converged() -> bool:
        rows[:] = drift(s, pipeline())
        return all(r.drift == 0 for r in rows)

    with contextlib.suppress(WaitTimeout):  # then the drift below says what did not converge
        wait_until(products_caught_up, timeout, what="products in every store")
    with contextlib.suppress(WaitTimeout):
        wait_until(converged, max(0.0, started + timeout - time.monotonic()), what="every entity in every store")
    _print_drift(rows, Format.table)
    if any(r.drift != 0 for r in rows):
        raise fail(f"stores did not converge within {timeout:.0f}s; see {worker_service.log_file}")
    console.print("[green]zero drift[/]: every derived store holds as many rows as PostgreSQL.")

    # The finance report judges a transaction only once all of it has been in ClickHouse for a few seconds.
    time.sleep(GRACE_SECONDS + 1)
    report = finance(s, pipeline=pipeline())
    print_finance(report)
    found = {e.kind for e in report.exceptions}
    missing = [k for k in shop.planted if k not in found]
    if missing:
        raise fail(f"the finance report did not find the planted {', '.join(missing)}")
    console.print(f"finance: the {len(shop.planted)} planted exceptions are found "
                  f"({len(report.exceptions)} in all, earlier demo runs included).")

    _demo_read_model(s)

    run = run_reconcile(s, pipeline())
    print_reconcile(run, "every key, every store")
    if run.drift_exceeds(0):
        raise fail("reconcile found keys that differ (above); `changeflow reconcile --repair` re-syncs them")
    console.print("[green]reconciled[/]: every key and every value in every store matches PostgreSQL. "
                  "Stop everything with `changeflow stack down`.")


def _demo_read_model(s: Settings, timeout: float = 120.0) -> None:
    """The seed's question answered from the stores: orders of users in New York (view ``ny_orders``), read
    back from every store that holds the view, through the store registry."""
    import psycopg  # ~80 ms at start-up: kept here

    from changeflow.deploy.workload import feed_users  # ~80 ms at start-up: kept here

    commerce = pipeline()
    spec, users = commerce.entity("ny_orders"), commerce.entity("users")
    fed = feed_users(s.kafka_bootstrap, users.raw_topic)
    console.print(f"users: {fed.events} change events written to {users.raw_topic} as Debezium's MongoDB connector "
                  f"writes them (the native stack has no MongoDB server; under docker-compose the connector does "
                  f"it), {fed.moved} moving to New York last")
    with psycopg.connect(commerce.source_dsn(s)) as conn:
        orders = conn.execute("SELECT id, user_id FROM orders").fetchall()
    expected = {str(oid) for oid, uid in orders
                if fed.users.get(uid, {}).get("profile", {}).get("address", {}).get("city") == "New York"}
    stores = {n: create(n, s, commerce) for n in used_by(commerce) if spec.stored_in(n)}
    found: dict[str, dict[str, Any]] = {}

    def every_store_holds_them() -> bool:
        for name, store in stores.items():
            try:
                found[name] = {key: row for key, row, _version in store.scan(spec)}
            except Exception:  # the view's table or index is made with its first row
                found[name] = {}
        return all(set(rows) == expected for rows in found.values())

    try:
        with contextlib.suppress(WaitTimeout):  # then the counts below say which store did not converge
            wait_until(every_store_holds_them, timeout, what="the ny_orders view in every store")
    finally:
        for store in stores.values():
            store.close()
    table = Table(title="orders of users in New York (view ny_orders)")
    for col in ("order", "user", "city", "total"):
        table.add_column(col)
    shown = next(iter(found.values()), {})
    for key in sorted(shown)[:8]:
        row = shown[key]
        table.add_row(key, str(row.get("user_name")), str(row.get("city")), str(row.get("total_amount")))
    console.print(table)
    counts = ", ".join(f"{len(rows)} in {name}" for name, rows in found.items())
    console.print(f"orders of users in New York: {counts}; {len(expected)} expected (PostgreSQL's orders joined with "
                  "the users written above)")
    if any(set(rows) != expected for rows in found.values()):
        raise fail("the ny_orders view did not converge; see the worker's log")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
