"""`changeflow connectors`: the pipeline's Debezium connectors, rendered from the pipeline file and
registered through the Kafka Connect REST API; what the source needs beforehand (`prepare`); removal."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from confluent_kafka.admin import AdminClient
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from changeflow import context
from changeflow.commands import args
from changeflow.commands.pipeline import catalog_dsn, load_pipeline
from changeflow.commands.sinks import active_groups
from changeflow.connectors.client import (
    ConnectorConfigError,
    ConnectorDefinition,
    ConnectorFailedError,
    ConnectUnavailableError,
    KafkaConnectClient,
)
from changeflow.connectors.render import RenderError, as_json, render
from changeflow.pipelines.outbox import specs
from changeflow.pipelines.spec import Pipeline, split_table, topic_part
from changeflow.sinks.base import create, names
from changeflow.sinks.base import names as store_names

app = typer.Typer(help="Debezium connectors through the Kafka Connect REST API.", no_args_is_help=True)
# Piped output (CI logs, tests) must not be cut at 80 columns.
console = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, soft_wrap=True)

SourceOption = Annotated[
    list[str] | None,
    typer.Option("--source", help="postgres or mongodb (repeat). Default: postgres when the pipeline has it "
                                  "(MongoDB runs only under docker-compose), else every source."),
]
DsnOption = Annotated[
    str | None,
    typer.Option("--dsn", help="A connection that may create the publication and grant (default: the stack's "
                               "superuser on the pipeline's database)."),
]


def fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    return typer.Exit(code)


def default_sources(pipeline: Pipeline, sources: list[str] | None) -> list[str]:
    if sources:
        unknown = sorted(set(sources) - {"postgres", "mongodb"})
        if unknown:
            args.usage(f"unknown source {unknown[0]!r}; use postgres or mongodb")
        return sources
    declared = [s for s in ("postgres", "mongodb") if getattr(pipeline.file.sources, s) is not None
                and any(e.source == s for e in pipeline.entities.values())]
    return ["postgres"] if "postgres" in declared else declared


def print_connector(state: dict[str, Any]) -> None:
    table = Table(title=f"connector {state.get('name')}")
    for col in ("part", "state", "worker"):
        table.add_column(col)
    connector = state.get("connector", {})
    table.add_row("connector", connector.get("state", "?"), connector.get("worker_id", ""))
    for task in state.get("tasks", []):
        table.add_row(f"task {task.get('id')}", task.get("state", "?"), task.get("worker_id", ""))
    console.print(table)


def run_prepare(pipeline: Pipeline, dsn: str | None, *, required: bool) -> bool:
    """Run `prepare` on a connection that may; when it may not, say what to give a DBA. True when done."""
    # Kept here for start-up cost (changeflow/commands/__init__.py): psycopg ~65 ms, connectors.prepare ~95 ms.
    import psycopg

    from changeflow.connectors import prepare

    try:
        with psycopg.connect(catalog_dsn(pipeline, dsn), connect_timeout=10) as conn:
            for line in prepare.apply(conn, pipeline):
                console.print(f"prepare: {escape(line)}", highlight=False)
        return True
    except psycopg.errors.InsufficientPrivilege as exc:
        message = (f"this connection may not prepare the source ({str(exc).strip()}); give the output of "
                   "`changeflow connectors prepare --print` to a DBA, then apply again")
    except psycopg.OperationalError as exc:
        message = (f"cannot connect to prepare the source ({str(exc).strip()}); pass --dsn, or give the output "
                   "of `changeflow connectors prepare --print` to a DBA")
    except prepare.PrepareError as exc:
        message = str(exc)
    if required:
        raise fail(message)
    err.print(f"[yellow]warning:[/] {escape(message)}", highlight=False)
    return False


@app.command("apply")
def apply(
    files: Annotated[
        list[Path] | None,
        typer.Argument(help="Connector files to apply as they are (default: the connectors rendered from the "
                            "pipeline, after `prepare`)."),
    ] = None,
    timeout: Annotated[float, typer.Option(min=0, help="Seconds to wait for RUNNING.")] = 180.0,
    source: SourceOption = None,
    dsn: DsnOption = None,
    no_prepare: Annotated[bool, typer.Option("--no-prepare", help="Skip `prepare` (a DBA has run it).")] = False,
) -> None:
    """Prepare the source, then validate with Connect, create or update (idempotent), wait until RUNNING.

    Exit codes: 0 every connector RUNNING; 1 Connect rejected a definition, a task failed or Connect is
    unreachable; 2 usage (a file that is missing, unreadable or not a connector definition)."""
    s = context.settings()
    if files:
        for path in files:
            args.existing_file(path, "connector file")
        try:
            definitions = [ConnectorDefinition.load(p) for p in files]
        except ValueError as exc:
            args.usage(str(exc))
    else:
        pipeline = load_pipeline()
        sources = default_sources(pipeline, source)
        try:
            definitions = render(pipeline, s, sources)
        except RenderError as exc:
            raise fail(str(exc)) from None
        if "postgres" in sources and not no_prepare:
            run_prepare(pipeline, dsn, required=False)
    client = KafkaConnectClient(s.connect_url)
    try:
        for definition in definitions:
            action = client.apply(definition)
            console.print(f"connector [bold]{escape(definition.name)}[/]: {action}")
            state = client.wait_running(definition.name, timeout=timeout)
            print_connector(state)
    except (ConnectorConfigError, ConnectorFailedError, ConnectUnavailableError, ValueError) as exc:
        raise fail(str(exc)) from None
    finally:
        client.close()


@app.command("status")
def status(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """State of every registered connector and its tasks."""
    s = context.settings()
    client = KafkaConnectClient(s.connect_url)
    try:
        states = [client.status(name) for name in client.list()]
    except ConnectUnavailableError as exc:
        raise fail(str(exc)) from None
    finally:
        client.close()
    if as_json:
        print(json.dumps(states, indent=2))
        return
    if not states:
        console.print("no connectors registered")
    for state in states:
        if state:
            print_connector(state)


@app.command("render")
def render_(source: SourceOption = None) -> None:
    """Print the pipeline's connector definitions as Kafka Connect JSON. One connector is one object, so
    `changeflow connectors render | curl -X POST -H 'Content-Type: application/json' --data @-
    http://127.0.0.1:8083/connectors` registers it; several are printed as a JSON array."""
    pipeline = load_pipeline()
    try:
        definitions = render(pipeline, context.settings(), default_sources(pipeline, source))
    except RenderError as exc:
        raise fail(str(exc)) from None
    if len(definitions) == 1:
        print(as_json(definitions[0]), end="")
    else:
        print(json.dumps([{"name": d.name, "config": d.config} for d in definitions], indent=2))


@app.command("prepare")
def prepare_(
    print_only: Annotated[bool, typer.Option("--print", help="Print the SQL for a DBA instead of running it.")]
    = False,
    dsn: DsnOption = None,
) -> None:
    """Publication for exactly the pipeline's tables, signal and heartbeat tables, grants to the replication
    role: run now (a connection that may), or printed as SQL for a DBA."""
    # Kept here for start-up cost (changeflow/commands/__init__.py): changeflow.connectors.prepare ~95 ms.
    from changeflow.connectors import prepare

    pipeline = load_pipeline()
    if print_only:
        try:
            print(prepare.script(pipeline), end="")
        except prepare.PrepareError as exc:
            raise fail(str(exc)) from None
        return
    run_prepare(pipeline, dsn, required=True)


@app.command("delete")
def delete(
    purge: Annotated[bool, typer.Option("--purge", help="Also remove everything derived: each store's objects, "
                                                      "the pipeline's topics and consumer groups.")] = False,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask.")] = False,
    dsn: DsnOption = None,
) -> None:
    """Remove the pipeline's connectors, its replication slot and its publication. The derived stores keep
    their data (and the source its signal and heartbeat tables) unless --purge: then every registered
    store removes what the pipeline created in it, and the pipeline's topics and consumer groups go too
    (refused while a worker of the pipeline runs)."""
    # Kept here for start-up cost (changeflow/commands/__init__.py): psycopg ~65 ms, connectors.prepare ~95 ms.
    import psycopg

    from changeflow.connectors import prepare

    pipeline = load_pipeline()
    definitions = render(pipeline, context.settings())
    names = [d.name for d in definitions]
    has_pg = pipeline.file.sources.postgres is not None
    what = ", ".join([*(f"connector {n}" for n in names),
                      *([f"slot {pipeline.slot}", f"publication {pipeline.publication}"] if has_pg else [])])
    if purge:
        groups = [pipeline.decode_group, *(pipeline.sink_group(n) for n in store_names())]
        busy = active_groups(groups)
        if busy:
            raise fail(f"a worker of pipeline {pipeline.name} is running ({', '.join(busy)}): stop it first; "
                       "nothing was removed")
        what += f", and every store's data, topics and consumer groups of pipeline {pipeline.name}"
    if not yes and not typer.confirm(f"remove {what}?"):
        raise typer.Exit(1)
    client = KafkaConnectClient(context.settings().connect_url)
    try:
        for name in names:
            if purge and name in client.list():
                # Connect keeps a deleted connector's offsets: without this, the same name created again
                # would resume after its old snapshot and the purged stores would never get the rows back.
                forgot = client.forget_offsets(name)
                console.print(f"connector {escape(name)}: offsets {'deleted' if forgot else 'NOT deleted'}",
                              highlight=False)
            console.print(f"connector {escape(name)}: {'deleted' if client.delete(name) else 'absent'}",
                          highlight=False)
    except ConnectUnavailableError as exc:
        raise fail(str(exc)) from None
    finally:
        client.close()
    if has_pg:
        try:
            with psycopg.connect(catalog_dsn(pipeline, dsn), connect_timeout=10) as conn:
                for line in prepare.drop(conn, pipeline):
                    console.print(escape(line), highlight=False)
        except (psycopg.Error, prepare.PrepareError) as exc:
            raise fail(f"{str(exc).strip()}; drop slot {pipeline.slot} and publication {pipeline.publication} "
                       "by hand (pg_drop_replication_slot, DROP PUBLICATION)") from None
    if purge:
        _purge_derived(pipeline)


def pipeline_topics(pipeline: Pipeline) -> list[str]:
    """Every topic the pipeline's connectors and worker write (raw, canonical, DLQ, schemas, derived events)."""
    topics = {*pipeline.raw_topics(), *pipeline.canonical_topics(), pipeline.dlq_topic, pipeline.schema_topic,
              *pipeline.event_topics(), pipeline.notifications_topic,
              # The views' lease: its record of the last owner is what tells a view stage that the state on its
              # disk is current; gone, the next owner rebuilds the views from the canonical topics.
              pipeline.views_lease_topic}
    # Outboxes: the table's own topic and the DLQ (the routed topics are found by prefix: `_purge_derived`).
    topics |= {t for o in specs(pipeline) for t in (o.raw_topic, o.dlq_topic)}
    if pipeline.file.sources.postgres is not None:
        prefix = pipeline.postgres_topic_prefix
        # Debezium's own: heartbeats, and the changes of the heartbeat and signal tables it writes to.
        topics.add(f"__debezium-heartbeat.{prefix}")
        for table in (pipeline.heartbeat_table, pipeline.signal_table):
            schema, name = split_table(table)
            topics.add(f"{prefix}.{topic_part(schema)}.{topic_part(name)}")
    return sorted(topics)


def _await_deletions(kind: str, futures: dict[str, Any], failures: list[str]) -> None:
    """Wait for each of the admin client's deletions; say each one done, keep each failure for the summary."""
    for name, future in futures.items():
        try:
            future.result()
            console.print(f"kafka: {kind} {escape(name)} deleted", highlight=False)
        except Exception as exc:
            failures.append(f"{kind.split()[-1]} {name}: {exc}")  # "topic x: …", "group y: …"


def _purge_derived(pipeline: Pipeline) -> None:
    """Each registered store's objects of the pipeline, then its topics and consumer groups."""
    failures: list[str] = []
    for name in names():
        store = create(name, context.settings(), pipeline)
        try:
            for line in store.purge() or [f"{name}: nothing to remove"]:
                console.print(escape(line), highlight=False)
        except Exception as exc:  # one unreachable store must not hide the others; said, and exit 1
            failures.append(f"{name}: {str(exc)[:200]}")
        finally:
            store.close()
    admin = AdminClient({"bootstrap.servers": context.settings().kafka_bootstrap, "log_level": 3})
    existing = set(admin.list_topics(timeout=15).topics)
    # Routed outbox topics, and the topics Faust makes under its app id (its assignor's leader topic).
    prefixes = (*(f"{o.topic_prefix}." for o in specs(pipeline)), f"{pipeline.worker_app_id}-")
    topics = [t for t in pipeline_topics(pipeline) if t in existing]
    topics += sorted(t for t in existing if t.startswith(prefixes) and t not in topics)
    if topics:
        _await_deletions("topic", admin.delete_topics(topics, operation_timeout=30), failures)
    groups = [pipeline.decode_group, *(pipeline.sink_group(n) for n in names()), pipeline.worker_app_id,
              pipeline.views_group, pipeline.views_input_group,
              *(f"{pipeline.namespace}-outbox-eventlog-{o.name}" for o in specs(pipeline))]
    known = {g.group_id for g in admin.list_consumer_groups(request_timeout=15).result().valid}
    wanted = [g for g in groups if g in known]
    if wanted:
        _await_deletions("consumer group", admin.delete_consumer_groups(wanted, request_timeout=15), failures)
    if pipeline.file.erasure.subjects:
        # Not derived data: what keeps an erased person out of a new snapshot (an order the source keeps, still
        # linked, stays anonymised) and the record of each request.
        console.print(f"kept: {pipeline.suppression_topic} and {pipeline.erasure_topic} (erasure), so an erased "
                      "person does not come back with the next snapshot", highlight=False)
    if failures:
        raise fail("purge incomplete: " + "; ".join(failures))
