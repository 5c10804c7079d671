"""`changeflow events tail` (outbox events for people) and `changeflow outbox prune` (delete captured outbox
rows); README "Outbox and events"."""

from __future__ import annotations

import contextlib
import json
import re
import sys
from typing import Annotated

import typer
from confluent_kafka import KafkaException
from rich.console import Console

from changeflow import context
from changeflow.commands import args
from changeflow.outbox.eventlog import load, table_name
from changeflow.outbox.events import BadEvent, Event, as_dict, idle_stop, line
from changeflow.outbox.events import tail as run_tail
from changeflow.pipelines.outbox import specs
from changeflow.reports import home

events_app = typer.Typer(help="Outbox events: read them as they arrive.", no_args_is_help=True)
outbox_app = typer.Typer(help="Outbox tables: housekeeping.", no_args_is_help=True)
console = Console(width=None if sys.stdout.isatty() else 200)


@events_app.command("tail")
def tail(
    topic: Annotated[list[str] | None, typer.Option(
        "--topic", help="Read this topic only (repeatable; default: every outbox's events and DLQ).")] = None,
    from_beginning: Annotated[bool, typer.Option("--from-beginning", help="Start at the oldest event.")] = False,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="Stop after N events.")] = None,
    idle: Annotated[float | None, typer.Option("--idle", min=0.1, help="Stop after S seconds without one.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """Print outbox events (topic, position, id, aggregate, type, payload; a dead letter's reason), committing
    nothing: tailing never moves any consumer's position."""
    pipeline = args.pipeline()
    topics = list(topic or [])
    if not topics:
        outboxes = specs(pipeline)
        if not outboxes:
            raise args.fail(f"pipeline {pipeline.name} declares no `outbox:`; name a topic with --topic", code=2)
        topics = [f"^{re.escape(o.topic_prefix)}\\..+" for o in outboxes]
        topics += list(dict.fromkeys(o.dlq_topic for o in outboxes))

    def emit(item: Event | BadEvent) -> None:
        if isinstance(item, BadEvent):
            print(json.dumps({"bad": str(item)}) if as_json else f"not an event: {item}", flush=True)
        else:
            print(json.dumps(as_dict(item), default=str) if as_json else line(item), flush=True)

    with contextlib.suppress(KeyboardInterrupt):
        try:
            run_tail(context.settings().kafka_bootstrap, topics, from_beginning=from_beginning, limit=limit,
                     idle_s=idle, emit=emit)
        except KafkaException as exc:
            raise args.fail(f"Kafka: {exc}") from None


@outbox_app.command("prune")
def prune(
    name: Annotated[str | None, typer.Option("--outbox", help="Only this outbox (default: every one).")] = None,
    wait: Annotated[float, typer.Option("--wait", min=0, help="Seconds to wait for the slot to confirm.")] = 60.0,
    limit: Annotated[int, typer.Option("--limit", min=1, help="At most N rows per outbox per run.")] = 100_000,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what would be deleted; delete nothing.")] = False,
) -> None:
    """Delete outbox rows Debezium has captured (committed at or below the slot's confirmed flush LSN), never
    one it has not; exit 1 when the slot did not confirm within --wait (nothing deleted then)."""
    # Kept here for start-up cost (changeflow/commands/__init__.py): psycopg ~140 ms, outbox.prune ~75 ms.
    import psycopg

    from changeflow.outbox.prune import PruneError
    from changeflow.outbox.prune import prune as run_prune

    pipeline = args.pipeline()
    outboxes = [o for o in specs(pipeline) if name is None or o.name == name]
    if not outboxes:
        known = ", ".join(o.name for o in specs(pipeline)) or "none"
        raise args.fail(f"no outbox {name!r} in pipeline {pipeline.name} (its outboxes: {known})" if name
                        else f"pipeline {pipeline.name} declares no `outbox:`", code=2)
    behind = False
    try:
        with psycopg.connect(pipeline.source_dsn(context.settings()), autocommit=True) as conn:
            for spec in outboxes:
                result = run_prune(conn, spec, pipeline.slot, wait_s=wait, limit=limit, dry_run=dry_run)
                if not result.captured:
                    behind = True
                    console.print(f"outbox {spec.name}: {result.candidates} row(s), none deleted: slot "
                                  f"{pipeline.slot} confirmed {result.confirmed}, below {result.watermark}",
                                  highlight=False)
                elif dry_run:
                    console.print(f"outbox {spec.name}: {result.candidates} captured row(s) would be deleted "
                                  f"(slot confirmed {result.confirmed} >= {result.watermark})", highlight=False)
                else:
                    console.print(f"outbox {spec.name}: {result.deleted} captured row(s) deleted (slot "
                                  f"confirmed {result.confirmed} >= {result.watermark})", highlight=False)
    except (PruneError, psycopg.OperationalError) as exc:
        raise args.fail(str(exc).strip()) from None
    if behind:
        raise typer.Exit(1)


@outbox_app.command("eventlog")
def eventlog(
    name: Annotated[str | None, typer.Option("--outbox", help="Only this outbox (default: every one with "
                                                               "`event_log: true`).")] = None,
    idle: Annotated[float | None, typer.Option("--idle", min=0.1, help="Stop after S seconds without an event "
                                                                       "(default: run until interrupted).")] = None,
) -> None:
    """Load outbox events into ClickHouse (`<database>.outbox_<name>`, one row per event id), committing each
    batch's offsets after its insert; outboxes with `event_log: true`, one after the other."""
    pipeline = args.pipeline()
    chosen = [o for o in specs(pipeline) if o.config.event_log and (name is None or o.name == name)]
    if not chosen:
        raise args.fail(f"pipeline {pipeline.name} has no outbox {name + ' ' if name else ''}with "
                        "`event_log: true`", code=2)
    settings = context.settings()
    client = home.client(settings)
    database = home.database(pipeline)
    try:
        for spec in chosen:
            with contextlib.suppress(KeyboardInterrupt):
                rows = load(client, settings.kafka_bootstrap, database, spec,
                            f"{pipeline.namespace}-outbox-eventlog-{spec.name}", stop=idle_stop(idle))
                console.print(f"outbox {spec.name}: {rows} event(s) loaded into "
                              f"{database}.{table_name(spec)}", highlight=False)
    finally:
        client.close()
