"""`changeflow dlq`: see what the pipeline could not decode, and what a store refused (quarantined for that
store), and send it back once the cause is fixed: an undecodable message to its source topic, a quarantined
record into its own store only (``--store``)."""

from __future__ import annotations

import json
import sys
from enum import StrEnum
from typing import Annotated, Any

import typer
from confluent_kafka import KafkaException
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from changeflow import context
from changeflow.sinks import base
from changeflow.sinks.base import FatalSinkError, RetriableSinkError

app = typer.Typer(help="Dead letters: list them, replay them once the cause is fixed.", no_args_is_help=True)

# Piped output (CI logs, tests) must not be cut at 80 columns.
console = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, soft_wrap=True)


class Format(StrEnum):
    table = "table"
    json = "json"


def _fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    return typer.Exit(code)


def _size(data: bytes | None) -> str:
    return "null" if data is None else f"{len(data)} B"


def _check_store(store: str | None) -> None:
    if store is not None and store not in base.names():
        raise _fail(f"unknown store {store!r}; known: {', '.join(sorted(base.names()))}", code=2)


StoreOption = Annotated[
    str | None, typer.Option("--store", help="Only what this store quarantined (redis, search, clickhouse).")
]


@app.command("list")
def list_(
    format: Annotated[Format, typer.Option("--format", help="table or json")] = Format.table,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="Only the newest N dead letters.")] = None,
    store: StoreOption = None,
) -> None:
    """Every dead letter on the DLQ topic (read from the beginning, nothing committed), oldest first; with
    ``--store S`` only the records store S refused (quarantined for it)."""
    # Kept here for start-up cost (changeflow/commands/__init__.py): changeflow.streams.dlq ~5 ms (median of 7).

    from changeflow.streams.dlq import for_store, iso_ms, masked, read_dead_letters, read_replays

    _check_store(store)
    settings, pipeline = context.settings(), context.pipeline()
    hidden = {topic: spec.dropped | spec.hashed for topic, spec in pipeline.raw_topics().items()}
    try:
        entries = [masked(e, hidden) for e in for_store(read_dead_letters(settings, pipeline), store)]
        replays = read_replays(settings, pipeline)
    except (KafkaException, TimeoutError) as exc:
        raise _fail(f"reading {pipeline.dlq_topic}: {exc}") from None
    total = len(entries)
    if limit is not None:
        entries = entries[-limit:]
    if format is Format.json:
        rows: list[dict[str, Any]] = []
        for e in entries:
            done = replays.get(e.replay_key)
            rows.append({
                **e.as_dict(),
                "replayed": done is not None,
                "replayed_at": iso_ms(done.replayed_at_ms) if done else None,
                "replayed_to": f"{done.topic}:{done.partition}:{done.offset}" if done else None,
            })
        print(json.dumps(rows, indent=2))
        return
    if not entries:
        console.print(f"no dead letters on {pipeline.dlq_topic}" + (f" quarantined by {store}" if store else ""))
        return
    what = f"quarantined by {store}" if store else "dead letters"
    table = Table(title=f"{what} on {pipeline.dlq_topic}: {len(entries)} of {total}")
    table.add_column("id", no_wrap=True)  # ids are copied into `dlq replay --id`: never split them
    for col in ("store", "entity", "error", "dead at", "key", "value", "copies", "replayed"):
        table.add_column(col, overflow="fold")
    for e in entries:
        done = replays.get(e.replay_key)
        table.add_row(
            escape(e.id), escape(e.store or "-"), escape(e.entity or "-"), escape(e.error), iso_ms(e.dead_at_ms) or "-",
            escape(f"{_size(e.key)} {e.as_dict()['key_preview']}"),
            escape(f"{_size(e.value)} {e.as_dict()['value_preview']}"),
            str(e.copies),
            f"[green]{iso_ms(done.replayed_at_ms)}[/]" if done else ("-" if e.replayable else "[red]not replayable[/]"),
        )
    console.print(table)


@app.command("replay")
def replay_(
    ids: Annotated[list[str] | None, typer.Option("--id", help="Dead-letter id (repeatable), from `dlq list`.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Every dead letter not replayed yet.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replay even ids already replayed.")] = False,
    format: Annotated[Format, typer.Option("--format", help="table or json")] = Format.table,
    store: StoreOption = None,
) -> None:
    """Send the original bytes back to their source topic and partition so the normal decode path
    handles them; a record a store quarantined is written into that store only, under its version guard
    (it applies only if still the newest). ``--store S`` alone replays everything S quarantined. Each
    replay is recorded, so running it again skips what is done."""
    # Kept here for start-up cost (changeflow/commands/__init__.py): sinks.runner ~240 ms, streams.dlq ~5 ms.

    from changeflow.sinks.runner import replay_into_store
    from changeflow.streams.dlq import (
        UnknownDeadLetterError,
        for_store,
        iso_ms,
        plan_replay,
        read_dead_letters,
        read_replays,
        record_store_replays,
        replay,
    )

    _check_store(store)
    if not ids and not all_ and store is None:
        raise _fail("say which dead letters to replay: --id ID (repeatable) or --all, or --store S for all "
                    "one store quarantined", code=2)
    if ids and all_:
        raise _fail("--id and --all exclude each other", code=2)
    settings, pipeline = context.settings(), context.pipeline()
    rows: list[dict[str, Any]] = []
    try:
        entries = for_store(read_dead_letters(settings, pipeline), store)
        replays = read_replays(settings, pipeline)
        plan = plan_replay(entries, replays, ids=ids or (), all_=all_ or not ids, force=force,
                           topics=frozenset(pipeline.raw_topics()) | frozenset(pipeline.canonical_topics()))
        raw = [e for e in plan.send if e.store is None]
        for sent in replay(settings, pipeline, raw):
            rows.append({"id": sent.id, "outcome": "replayed", "replayed_at": iso_ms(sent.replayed_at_ms),
                         "detail": f"sent to {sent.topic}:{sent.partition}:{sent.offset}", "topic": sent.topic,
                         "partition": sent.partition, "offset": sent.offset})
        by_store: dict[str, list[Any]] = {}
        for e in plan.send:
            if e.store is not None:
                by_store.setdefault(e.store, []).append(e)
        for name, group in by_store.items():
            usable = [e for e in group if e.value is not None]
            results = replay_into_store(settings, pipeline, name,
                                        [(e.value, (e.source_topic, e.partition, e.offset)) for e in usable])
            done = [e for e, res in zip(usable, results, strict=True) if res.outcome != "rejected"]
            record_store_replays(settings, pipeline, done)
            for e, res in zip(usable, results, strict=True):
                rows.append({"id": e.id, "store": name, "outcome": res.outcome, "detail": res.detail,
                             "entity": res.entity, "key": res.key, "version": res.version})
    except UnknownDeadLetterError as exc:
        raise _fail(f"{exc} (not on {pipeline.dlq_topic}" + (f" for {store}" if store else "")
                    + "; see `changeflow dlq list`)") from None
    except (KafkaException, TimeoutError) as exc:
        raise _fail(f"replay: {exc}") from None
    except (RetriableSinkError, FatalSinkError) as exc:
        raise _fail(f"replay into {store or 'the store'}: {exc}") from None

    refused = [r for r in rows if r["outcome"] == "rejected"]
    if format is Format.json:
        print(json.dumps({
            "replayed": [r for r in rows if r["outcome"] != "rejected"],
            "rejected": refused,
            "skipped": [{"id": s.entry.id, "store": s.entry.store, "reason": s.reason} for s in plan.skip],
        }, indent=2))
    else:
        table = Table(title=f"replay: {len(rows) - len(refused)} replayed, {len(refused)} refused again, "
                            f"{len(plan.skip)} skipped")
        for col in ("id", "store", "outcome", "detail"):
            table.add_column(col, overflow="fold")
        colour = {"replayed": "green", "applied": "green", "superseded": "cyan", "reread": "cyan", "rejected": "red"}
        for row in rows:
            table.add_row(escape(row["id"]), escape(row.get("store") or "-"),
                          f"[{colour[row['outcome']]}]{row['outcome']}[/]", escape(row["detail"]))
        for s in plan.skip:
            table.add_row(escape(s.entry.id), escape(s.entry.store or "-"), "[yellow]skipped[/]", escape(s.reason))
        console.print(table)
    if refused:
        raise typer.Exit(1)
